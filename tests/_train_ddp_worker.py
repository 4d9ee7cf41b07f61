"""torchrun worker of tests/test_train.py::test_ddp_gloo: trains two kinds on CPU ranks, saves each rank's heads."""
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from hydra_fast.train import distributed as du
from hydra_fast.train.config import TrainConfig, recipes_for
from hydra_fast.train.dataset import SelfDistillData
from hydra_fast.train.trainer import Trainer


def main(model_dir: str, data_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    d = du.init("cpu")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    base.requires_grad_(False)
    data = SelfDistillData(data_dir, base)
    config = TrainConfig(recipes=recipes_for(["medusa", "hydra++"], lr=1e-2, noise=0.1), steps=12, batch_size=2,
                         log_every=1, ckpt_every=6, eval_fraction=0.2, warmup=0.1)
    trainer = Trainer(base, data, config, out_dir, dist=d, progress=False)
    summary = trainer.fit()
    torch.save({"heads": {s.recipe.kind: s.heads.state_dict() for s in trainer.sets}, "summary": summary,
                "world": d.world}, Path(out_dir) / f"rank{d.rank}.pt")
    du.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
