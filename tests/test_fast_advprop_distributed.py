"""Shuffling BN across ranks: one shared permutation, a partition of the global batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fap.methods import FastAdvProp
from test_fast_advprop import tiny_model

WORLD, B_A, GROUP = 2, 4, 2  # per rank: 4 adversarial images in 2 ghost groups -> 4 BN groups


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(100 + rank)  # ranks draw different random numbers, as in a real job
        model = tiny_model(aux_group_size=GROUP)
        # sample id encoded in the pixels: image i of rank r is filled with 100*r + i
        ids = torch.arange(B_A) + 100 * rank
        x = ids.float().view(-1, 1, 1, 1).expand(B_A, 3, 2, 2).contiguous()
        y = ids.clone()
        x_new, y_new = FastAdvProp()._shuffle(model, x, y)
        torch.save({"ids_in": ids, "ids_out": x_new[:, 0, 0, 0].long(), "labels_out": y_new},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_shuffle_partitions_the_global_batch_and_changes_every_group(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    ids_in = torch.cat([r["ids_in"] for r in res])
    ids_out = torch.cat([r["ids_out"] for r in res])
    assert sorted(ids_out.tolist()) == sorted(ids_in.tolist())  # nothing duplicated or dropped
    assert torch.equal(ids_out, torch.cat([r["labels_out"] for r in res]))  # images and labels move together

    def group(position_in_global_batch):
        return position_in_global_batch // GROUP  # rank-major: ranks x ghost groups

    before = {int(i): group(p) for p, i in enumerate(ids_in)}
    after = {int(i): group(p) for p, i in enumerate(ids_out)}
    assert all(before[i] != after[i] for i in before)
    assert {after[i] // (B_A // GROUP) for i in ids_in.tolist() if i < 100} == {0, 1}  # rank 0's images reach both ranks
