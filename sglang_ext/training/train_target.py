"""`dflare train-target`: train a small, standard ``Qwen3ForCausalLM`` on the chat corpus.

The demo target is deep and narrow (many layers of head_dim 64) so that drafters at the paper's depth
ratios (DFlash ~L/7, DFlare ~L/5 layers) have layers to tap, with taps <= L-2 as SGLang requires, while
the whole pair stays a few MB. The architecture is unmodified Qwen3 so SGLang loads it as is.

Training is plain next-token prediction on packed windows of whole conversations (prompt included: it
teaches the code distribution), AdamW + cosine with warmup, bf16 autocast on GPU. The held-out loss is
measured on assistant tokens only, one unpacked sample at a time, which is the number the docs report.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from sglang_ext.training.data import TokenizedChats, packed_windows, pad_batch
from sglang_ext.training.loop import autocast, cosine_with_warmup, pick_device, steps_for_budget

logger = logging.getLogger(__name__)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def build_config(args: argparse.Namespace, vocab_size: int, eos_id: int, pad_id: int):  # -> Qwen3Config
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},  # Qwen3 default
        tie_word_embeddings=True,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
    )


def _special_ids(tokenizer_dir: Path) -> tuple[int, int, int]:
    """(vocab size, end-of-turn id, pad id) from tokenizer files, without needing transformers' tokenizer."""
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    vocab = dict(tok["model"]["vocab"])
    vocab.update({t["content"]: t["id"] for t in tok.get("added_tokens", [])})
    return max(vocab.values()) + 1, vocab[cfg["eos_token"]], vocab[cfg["pad_token"]]


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module, chats: TokenizedChats, device: torch.device, batch: int = 32
) -> float:
    """Mean cross-entropy (nats/token) on the assistant tokens of held-out samples."""
    model.eval()
    total, count = 0.0, 0
    for lo in range(0, len(chats), batch):
        rows = list(range(lo, min(lo + batch, len(chats))))
        ids, real = pad_batch([chats.samples[i] for i in rows], pad_id=0)
        ids, real = ids.to(device), real.to(device)
        with autocast(device):
            logits = model(input_ids=ids, attention_mask=real.long()).logits.float()
        targets = ids[:, 1:]
        weight = real[:, 1:].clone()
        for r, i in enumerate(rows):
            weight[r, : chats.prompt_lens[i] - 1] = False  # score only the response tokens
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
        total += float((ce * weight).sum())
        count += int(weight.sum())
    model.train()
    return total / max(1, count)


def save_target(model: torch.nn.Module, out: Path, tokenizer_dir: Path, eos_id: int, pad_id: int) -> None:
    """config.json + bf16 model.safetensors (tied lm_head left out) + generation config + tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    model.config.dtype = torch.bfloat16
    # SGLang resolves the model class from `architectures` only; to_json_file leaves it out otherwise.
    model.config.architectures = [type(model).__name__]
    model.config.to_json_file(str(out / "config.json"))
    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    generation = {"eos_token_id": [eos_id], "pad_token_id": pad_id, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)


def load_chats_file(path: Path, tokenizer_dir: Path, max_len: int) -> TokenizedChats:
    """A tokenised ``.safetensors`` file, or a corpus ``.jsonl`` encoded here with the chat template."""
    if path.suffix == ".safetensors":
        return TokenizedChats.load(path)
    from transformers import AutoTokenizer

    from sglang_ext.training.corpus import load_chats
    from sglang_ext.training.data import encode_chats

    return encode_chats(AutoTokenizer.from_pretrained(str(tokenizer_dir)), load_chats(path), max_len)


def train(args: argparse.Namespace) -> dict[str, float]:
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    vocab, eos_id, pad_id = _special_ids(args.tokenizer)
    chats = load_chats_file(args.data, args.tokenizer, args.max_positions)
    heldout = load_chats_file(args.heldout, args.tokenizer, args.max_positions) if args.heldout else None
    model = Qwen3ForCausalLM(build_config(args, vocab, eos_id, pad_id)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    gen = torch.Generator().manual_seed(args.seed)
    windows = packed_windows(chats, args.seq_len, gen)
    per_epoch = max(1, len(windows) // args.batch)

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(device, non_blocking=True)
        with autocast(device):
            logits = model(input_ids=batch[:, :-1]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())

    def probe() -> None:
        loss_of(windows[: args.batch]).backward()
        opt.zero_grad(set_to_none=True)

    steps, per_step = args.steps, 0.0
    if args.time_budget:
        steps, per_step = steps_for_budget(probe, args.time_budget, device)
    steps = int(min(steps, per_epoch * args.max_epochs))
    logger.info(
        "target: %d params, %d windows/epoch, %d steps (%.3fs/step)", n_params, len(windows), steps, per_step
    )
    log = (args.out / "train_log.jsonl").open("w") if args.out else None
    cursor, start = 0, time.perf_counter()
    bar = tqdm(range(steps), desc="target", mininterval=2.0)
    for step in bar:
        if cursor + args.batch > len(windows):
            windows, cursor = packed_windows(chats, args.seq_len, gen), 0
        lr = args.lr * cosine_with_warmup(step, steps, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = loss_of(windows[cursor : cursor + args.batch])
        cursor += args.batch
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
            if log:
                log.write(json.dumps({"step": step, "loss": loss.item(), "lr": lr}) + "\n")
    metrics = {
        "params": n_params,
        "steps": steps,
        "epochs": steps / per_epoch,
        "train_tokens_per_epoch": len(windows) * args.seq_len,
        "train_seconds": time.perf_counter() - start,
        "final_train_loss": float(loss.item()) if steps else float("nan"),
    }
    if heldout is not None:
        metrics["heldout_loss"] = heldout_loss(model, heldout, device)
    if args.out:
        save_target(model.float(), args.out, args.tokenizer, eos_id, pad_id)
        (args.out / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if log:
            log.close()
    return metrics


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dflare train-target", description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="train .safetensors (tokenised) or corpus .jsonl")
    p.add_argument("--heldout", type=Path, default=None, help="held-out samples, same formats")
    p.add_argument("--tokenizer", type=Path, required=True, help="directory from train-tokenizer")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--max-positions", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=float, default=0.04, help="warmup fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--time-budget", type=float, default=None, help="seconds; overrides --steps")
    p.add_argument("--max-epochs", type=float, default=1e9)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    metrics = train(args)
    print(json.dumps(metrics, indent=2))
    return 0
