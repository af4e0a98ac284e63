"""Generation with Muffin: batched prefill, then one token at a time from a preallocated KV cache.

    python sample.py --ckpt=out/ddpo --image=scene.png --prompt="Describe the image in detail."
    python sample.py --ckpt=out/ddpo --image=a.png --temperature=0.7 --top_p=0.9

Prompts of different lengths are left-padded: RoPE only sees position differences, so a row
shifted right by its padding computes the same attention as alone, once its pad slots are masked.
The decode step has static shapes and no host synchronisation (sampling uses the exponential
trick instead of torch.multinomial; finished rows are tracked on the device and checked every
`check_every` tokens), so with --compile it is captured in a CUDA graph.
Tests: python -m pytest tests/test_sample.py
"""
from dataclasses import dataclass

import torch

import cli
from data import STOP, Tokenizer, check_tokenizer, image_tensor, load_image, prompt_ids
from model import Muffin


@dataclass
class SampleConfig:
    ckpt: str = "out/ddpo"        # a Muffin checkpoint directory (ours or the official release)
    tokenizer: str = ""           # default: <ckpt>/tokenizer.model
    image: str = ""                # the picture to ask about (required)
    prompt: str = "Describe the image in detail."
    max_new_tokens: int = 128
    temperature: float = 0.0      # 0: greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # RLHF-V's evaluation used 1.1 (with beam search, not here)
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    compile: bool = False


def next_token(logits, seen, temperature, top_p, repetition_penalty):
    """logits [B, V] fp32 -> token ids [B]. seen [B, V] bool marks tokens already in the row, whose
    logits are divided (if positive) or multiplied by the penalty, as transformers does."""
    if repetition_penalty != 1.0:
        logits = torch.where(seen, torch.where(logits > 0, logits / repetition_penalty,
                                               logits * repetition_penalty), logits)
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    # argmax(p / Exp(1)) samples from p without the host sync of torch.multinomial
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)


def decode_step(model, tokens, pos, pad, seen, settings):
    """One token for every row: tokens [B] at cache slot pos (a 1-element tensor)."""
    slots = torch.arange(model.cache_len, device=tokens.device)
    mask = ((slots <= pos) & (slots >= pad[:, None]))[:, None, None, :]
    logits = model(tokens[:, None], input_pos=pos, mask=mask)[:, -1].float()
    return next_token(logits, seen, *settings)


@torch.no_grad()
def generate(model, tok, images, questions, max_new_tokens=128, temperature=0.0, top_p=1.0,
             repetition_penalty=1.0, check_every=16, compile=False):
    """images [B, 3, H, W] (one per question), questions: list of B strings -> B answers (text
    before the first "###", stripped)."""
    device = images.device
    prompts = [prompt_ids(tok, q, model.config.n_query) for q in questions]
    B, P = len(prompts), max(len(p) for p in prompts)
    pad = torch.tensor([P - len(p) for p in prompts], device=device)
    ids = torch.tensor([[tok.pad_id] * (P - len(p)) + p for p in prompts], device=device)
    model.setup_cache(B, P + max_new_tokens)
    settings = (temperature, top_p, repetition_penalty)
    stop = torch.zeros(tok.vocab_size, dtype=torch.bool, device=device)
    stop[[i for i in range(tok.sp.get_piece_size()) if STOP in tok.sp.id_to_piece(i)] + [tok.eos_id]] = True
    seen = torch.zeros(B, tok.vocab_size, dtype=torch.bool, device=device).scatter_(1, ids, True)
    try:
        slots = torch.arange(P + max_new_tokens, device=device)
        t = torch.arange(P, device=device)
        # causal over the prompt, pad slots hidden; a pad query sees itself so no row is all -inf
        mask = (slots[None, :] <= t[:, None]) & ((slots[None, :] >= pad[:, None, None]) | (slots == t[:, None]))
        logits = model(ids, images=images, input_pos=t, mask=mask[:, None])[:, -1].float()
        token = next_token(logits, seen, *settings)
        step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True) if compile else decode_step
        out, done, pos = [token], stop[token], torch.tensor([P], device=device)
        for i in range(1, max_new_tokens):
            if i % check_every == 0 and bool(done.all()):
                break
            seen.scatter_(1, token[:, None], True)
            token = step(model, token, pos, pad, seen, settings)
            pos = pos + 1
            token = token.masked_fill(done, tok.pad_id)
            out.append(token)
            done = done | stop[token]
    finally:
        model.clear_cache()
    rows = torch.stack(out, 1).tolist()
    return [tok.decode(r).split(STOP)[0].strip() for r in rows]


def main(argv):
    cfg = cli.parse_args(SampleConfig, argv, paths=("ckpt", "tokenizer", "image"))
    if not cfg.image:
        raise cli.UsageError("--image is required: the picture to describe")
    torch.manual_seed(cfg.seed)
    model = Muffin.from_pretrained(cfg.ckpt).to(cfg.device).eval()
    tok_file = cfg.tokenizer or f"{cfg.ckpt}/tokenizer.model"
    tok = Tokenizer.from_pretrained(tok_file)
    check_tokenizer(tok, model.config, tok_file)
    image = image_tensor(load_image(cfg.image), model.config.vision.img_size)[None].to(cfg.device)
    print(generate(model, tok, image, [cfg.prompt], cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                   cfg.repetition_penalty, compile=cfg.compile)[0])


if __name__ == "__main__":
    cli.run(main)
