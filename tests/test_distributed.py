"""DDP through the engine's own code path with the gloo backend on CPU: 2 ranks keep identical weights."""
from __future__ import annotations

from pathlib import Path

import torch

from test_training_engine import make_preprocessed, make_trainer


def _rank_main(rank: int, world: int, pre: str, out: str) -> None:
    from nnsynth.training.trainers.seq2seq import Seq2SeqTrainer
    from nnsynth.utils.files import load_json
    torch.set_num_threads(1)
    plans = load_json(Path(pre) / "nnsynthPlans.json")
    t = Seq2SeqTrainer(plans, "2d", 0, Path(pre), Path(out), "cpu", num_epochs=1, iters_per_epoch=3,
                       rank=rank, world_size=world)
    t.final_validation = lambda: None
    t.run_training()
    torch.save({k: v.clone() for k, v in t.network.state_dict().items()}, Path(out) / f"weights_rank{rank}.pt")
    if t.label_head is not None:
        torch.save({k: v.clone() for k, v in t.label_head.state_dict().items()}, Path(out) / f"head_rank{rank}.pt")
    batch = t.sampler.next_batch()
    drawn = batch["source_idx"].tolist() if "source_idx" in batch else []   # multi-source batches carry all
    torch.save(batch["cases"] + drawn, Path(out) / f"batch_rank{rank}.pt")


def test_ddp_gloo_two_ranks_identical_weights(tmp_path):
    from nnsynth.training.distributed import launch
    pre = make_preprocessed(tmp_path / "pre", n_cases=5)
    out = tmp_path / "out"
    out.mkdir()
    launch(2, _rank_main, (str(pre), str(out)), backend="gloo")
    w0 = torch.load(out / "weights_rank0.pt")
    w1 = torch.load(out / "weights_rank1.pt")
    init = make_trainer(pre, tmp_path / "init")
    init.initialize()
    changed = False
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=1e-6)
        changed |= not torch.allclose(w0[k], init.network.state_dict()[k].to(w0[k].dtype))
    assert changed                                  # the steps did update the weights
    # the ranks drew different data (their own sampler streams)
    assert torch.load(out / "batch_rank0.pt") != torch.load(out / "batch_rank1.pt")
    assert (out / "fold_0" / "checkpoint_final.pth").is_file()   # written by rank 0


def test_ddp_keeps_the_seq2seq_label_head_identical_on_every_rank(tmp_path):
    """The label head is not DDP's: the engine broadcasts it and averages its gradients, so the ranks agree."""
    from nnsynth.training.distributed import launch
    from test_seq2seq_label_head import _labelled
    pre = _labelled(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    launch(2, _rank_main, (str(pre), str(out)), backend="gloo")
    h0, h1 = torch.load(out / "head_rank0.pt"), torch.load(out / "head_rank1.pt")
    init = make_trainer(pre, tmp_path / "init")
    init.initialize()
    assert init.label_head is not None
    for k, v in h0.items():
        torch.testing.assert_close(v, h1[k], rtol=0, atol=1e-6)
        assert not torch.allclose(v, init.label_head.state_dict()[k])   # the head did train
    w0, w1 = torch.load(out / "weights_rank0.pt"), torch.load(out / "weights_rank1.pt")
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=1e-6)


def test_cli_ranks_split_the_cpu_threads_and_only_rank_0_reports_progress():
    """``nnsynth_train --num-gpus N --device cpu``: each rank takes its share of the threads, and rank > 0 logs
    warnings only (rank 0 alone prints the epoch lines)."""
    import logging
    from nnsynth.cli.train import configure_rank
    log = logging.getLogger("nnsynth")
    threads, level = torch.get_num_threads(), log.level
    try:
        torch.set_num_threads(4)
        assert configure_rank(0, 2, torch.device("cpu")) == torch.device("cpu")
        assert torch.get_num_threads() == 2 and log.level == level
        torch.set_num_threads(1)
        configure_rank(1, 2, torch.device("cpu"))
        assert torch.get_num_threads() == 1 and log.level == logging.WARNING   # never below one thread
        assert configure_rank(1, 2, torch.device("cuda")) == torch.device("cuda", 1)
    finally:
        torch.set_num_threads(threads)
        log.setLevel(level)
