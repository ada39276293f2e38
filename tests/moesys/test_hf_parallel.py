"""Import on real gloo ranks: at EP 4, EP 2 and EP 2 x FSDP2 each rank reads only the slices it owns
(safetensors get_slice) straight into its shards, and the logits equal transformers'; built on the
meta device, one training step's loss and every gradient equal transformers' at EP 2 and EP 2 x FSDP2."""
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from moesys import hf  # noqa: E402
from moesys.decoder import Decoder  # noqa: E402
from hf_models import (FAMILIES, VOCAB, build_hf, build_hf_one_moe_layer, grads_in_moesys_layout,  # noqa: E402
                       sharded_import_worker, training_step_worker)


@pytest.mark.slow
@pytest.mark.multirank
def test_sharded_import_reads_own_slices_and_equals_transformers(rank_pool, tmp_path):
    paths, want, expert_bytes = {}, {}, {}
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    for f in FAMILIES:
        paths[f] = str(tmp_path / f)
        ref = build_hf(f, paths[f])
        with torch.no_grad():
            want[f] = ref(x).logits.numpy()
        dcfg, moe = hf.configs_from_settings(hf.derive_settings(hf.read_config(paths[f])))
        with torch.device("meta"):
            model = Decoder(dcfg, moe)
        expert_bytes[f] = sum(p.numel() * 4 for n, p in model.named_parameters() if ".moe.experts." in n)
    # two experts: at EP 4 each expert's F is split over two ranks (each reads its F columns only)
    paths["mixtral_e2"] = str(tmp_path / "mixtral_e2")
    ref = build_hf("mixtral", paths["mixtral_e2"], num_local_experts=2)
    with torch.no_grad():
        want["mixtral_e2"] = ref(x).logits.numpy()
    dcfg, moe = hf.configs_from_settings(hf.derive_settings(hf.read_config(paths["mixtral_e2"])))
    with torch.device("meta"):
        model = Decoder(dcfg, moe)
    expert_bytes["mixtral_e2"] = sum(p.numel() * 4 for n, p in model.named_parameters() if ".moe.experts." in n)
    results = rank_pool.run(sharded_import_worker, 4, paths, x, timeout_s=300)
    for rank, res in enumerate(results):
        for (family, layout), (logits, read) in res.items():
            np.testing.assert_allclose(logits, want[family], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{family} {layout} rank {rank}")
            # EP 4: a quarter of the experts; EP 2: half; EP 2 x FSDP 2: half over ep, that half again over edp
            assert read <= expert_bytes[family] / (2 if layout == "ep2" else 4), (family, layout, rank, read, expert_bytes[family])
            assert read > 0



@pytest.mark.slow
@pytest.mark.multirank
def test_training_step_on_ranks_equals_transformers(rank_pool, tmp_path):
    """Per family on 4 gloo ranks at EP 2 (two replicas of each expert) and EP 2 x FSDP2, built on the
    meta device and loaded per rank: one training step's loss (cross-entropy + balance loss) and every
    gradient equal transformers' on the whole batch in one process. The balance loss: transformers adds
    router_aux_loss_coef x E x sum_i f_i P_i with f_i summing to K, i.e. K x moesys's Switch loss for one
    MoE layer, so the import's moe.aux_loss_coef = K x router_aux_loss_coef; with moe.aux_loss=global_batch
    the routes are counted over every rank's tokens, as transformers counts the whole batch."""
    x = torch.randint(0, VOCAB, (4, 11), generator=torch.Generator().manual_seed(2))
    paths, want = {}, {}
    for f in FAMILIES:
        paths[f] = str(tmp_path / f)
        ref = build_hf_one_moe_layer(f, paths[f]).train()
        out = ref(x, labels=x)  # transformers shifts the labels itself; the balance loss is in out.loss
        if f != "deepseek_v3":
            assert out.aux_loss.item() > 0
        out.loss.backward()
        dcfg, moe = hf.configs_from_settings(hf.derive_settings(hf.read_config(paths[f])))
        with torch.device("meta"):
            model = Decoder(dcfg, moe)
        if f == "deepseek_v3":  # no balance loss in transformers' DeepSeek-V3: none in moesys either
            assert moe.aux_loss == "none"
        else:
            assert moe.aux_loss_coef == pytest.approx(moe.top_k * 0.05)
        want[f] = (out.loss.item(), grads_in_moesys_layout(ref, model, paths[f]))
    results = rank_pool.run(training_step_worker, 4, paths, x, timeout_s=300)
    for (family, layout), (loss, grads) in results[0].items():
        ref_loss, ref_grads = want[family]
        assert loss == pytest.approx(ref_loss, rel=1e-5), (family, layout)
        assert set(grads) == set(ref_grads), (family, layout, set(grads) ^ set(ref_grads))
        for name, g in ref_grads.items():
            torch.testing.assert_close(torch.from_numpy(grads[name]), g, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{family} {layout} {name}: {m}")
    for res in results[1:]:  # every rank agrees on the loss
        assert {k: v[0] for k, v in res.items()} == {k: v[0] for k, v in results[0].items()}
