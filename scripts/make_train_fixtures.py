"""Reference values for RESSA's loss terms, from PyTorch's own functions.

Writes tests/fixtures/train/distill.safetensors: random student/teacher logits [B, T, V],
targets with padding, and the expected CE (`F.cross_entropy`, ignore_index=-100), the
reference KL (`F.kl_div(log_softmax(s/T), log_softmax(t/T), reduction="batchmean",
log_target=True)`, over all positions) and the pad-masked token-mean KL times T², at T = 1 and 2.
Expected values are computed in float64 from the float32 inputs.

    python scripts/make_train_fixtures.py
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "train"


def main():
    torch.manual_seed(7)
    b, t, v = 3, 6, 13
    student = (torch.randn(b, t, v) * 2.0).float()
    teacher = (torch.randn(b, t, v) * 2.0).float()
    targets = torch.randint(0, v, (b, t))
    lengths = torch.tensor([6, 4, 1])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    labels = targets.masked_fill(mask == 0, -100)
    s64, t64 = student.double(), teacher.double()
    out = {
        "student": student,
        "teacher": teacher,
        "targets": targets.masked_fill(mask == 0, 0).to(torch.int64),
        "mask": mask,
        "ce": F.cross_entropy(s64.reshape(-1, v), labels.reshape(-1), ignore_index=-100).reshape(1),
    }
    for temp in (1.0, 2.0):
        ls = F.log_softmax(s64 / temp, dim=-1)
        lt = F.log_softmax(t64 / temp, dim=-1)
        reference = F.kl_div(ls, lt, reduction="batchmean", log_target=True)
        per_pos = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
        token_mean = (per_pos * mask.double()).sum() / mask.double().sum() * temp * temp
        tag = int(temp)
        out[f"kl_reference_t{tag}"] = reference.reshape(1)
        out[f"kl_token_mean_t{tag}"] = token_mean.reshape(1)
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: x.contiguous() for k, x in out.items()}, str(OUT / "distill.safetensors"))
    print({k: (x.item() if x.numel() == 1 else tuple(x.shape)) for k, x in out.items()})


if __name__ == "__main__":
    main()
