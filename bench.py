"""Speed of the DDPO training step, the reference log-prob pass and greedy KV-cache decoding, for
named shapes, optionally against transformers' LlamaForCausalLM. Prints one table.

    python bench.py                                 # tiny on a CPU; llama-1.1b and llama-1.1b-mm on CUDA
    python bench.py --shape=llama-1.1b-mm --rows=8 --seq=1024
    python bench.py --shape=llama-1.1b --grad_ckpt  # the step with activation checkpointing off and on
    python bench.py --compile                       # torch.compile the step's forward and the decode step
    python bench.py --compare                       # + transformers (no dependency: pip install it)
    python bench.py --lora_rank=64                  # + the step with LoRA adapters (base frozen): memory beside full
    python bench.py --plan=muffin-13b --lora_rank=64  # activation bytes per token of the real width (docs/one-gpu.md)
    python bench.py --shape=tiny --compare          # all of it on a CPU, in seconds

Each number is the median of --iters runs after --warmup untimed ones (allocation, optimizer state,
compilation), perf_counter after torch.cuda.synchronize. Weights are random, made on the device.
  step    train.forward_loss on 2B rows (B chosen, then B rejected, sharing B images; cached reference
          log-probs) + backward + grad clip + AdamW (fused on CUDA); bf16 autocast on CUDA, fp32 on a CPU.
          MFU = model.train_flops / time / model.peak_flops; GiB = torch.cuda.max_memory_allocated;
          both n/a on a CPU (no peak FLOP/s to divide by, no allocator statistics).
          saved MiB = the bytes autograd keeps for backward (saved-tensor hooks; any device; weights
          excluded); states MiB = weights + gradients + AdamW moments of what trains. With --lora_rank
          a row +lora<r>: adapters on the decoder blocks' Linears, every other weight frozen (bf16 on
          CUDA); its MFU counts 4 FLOPs per frozen weight per token (no weight gradient), tower forward only.
  ref     the same forward under no_grad, to per-token log-probs, as train.reference_logps runs it.
  decode  sample.generate's prefill, then greedy sample.decode_step at batch 1 and 8 (bf16 weights on
          CUDA). tok/s = batch x (N - 1) / (time of N tokens - time of 1): the prefill drops out.
          beam3@1: one prompt, 3 beams (sample.generate_ids, no stop token): answer tokens per second.
          GB/s = the bytes a step reads (the weights but the embedding, the whole static KV cache) x steps/s.
--compare: transformers loads the weights our LLaMA saved with save_pretrained (checked on the logits),
runs the same step and reference pass, and decodes with generate() and its static cache. For the
multimodal shapes the decoder alone is compared. The last rows are the ratios ours / transformers.
Tests: python -m pytest tests/test_bench.py
"""
import gc
import importlib.util
import statistics
import tempfile
import time
from dataclasses import dataclass, replace

import torch

import cli
import ddpo
import lora
import sample
from model import CONFIGS, LLaMA, Muffin, autocast, peak_flops, train_flops
from train import TrainConfig, forward_loss

# name: (config, with the vision tower, default sizes). The <im_patch> id must be inside the vocabulary:
# the real tokenizer appends it (vocab 32004); here the last id stands in for it, so that both 1.1B
# shapes have exactly TinyLlama's decoder, which --compare then measures once.
SHAPES = {
    "tiny": (CONFIGS["tiny"], True, dict(rows=4, seq=64, prompt=16, new_tokens=32)),
    "llama-1.1b": (CONFIGS["llama-1.1b"], False, dict(rows=8, seq=1024, prompt=128, new_tokens=128)),
    "llama-1.1b-mm": (replace(CONFIGS["llama-1.1b"], im_patch_id=31999), True,
                      dict(rows=8, seq=1024, prompt=128, new_tokens=128)),
    # Muffin-13B's width and tower with 4 of its 40 decoder blocks: the one-GPU memory plan's step
    # (docs/one-gpu.md) measured on a card, 4 pairs of 2,048 tokens; the other blocks scale linearly
    "muffin-13b-4": (replace(CONFIGS["muffin-13b"], llm=replace(CONFIGS["muffin-13b"].llm, num_hidden_layers=4),
                             im_patch_id=32003), True, dict(rows=8, seq=2048, prompt=128, new_tokens=16)),
}
COLUMNS = ("step tok/s", "pairs/s", "MFU", "step GiB", "saved MiB", "states MiB", "ref tok/s",
           "dec@1 tok/s", "dec@1 GB/s", "dec@8 tok/s", "dec@8 GB/s", "beam3@1 tok/s")


@dataclass
class BenchConfig:
    shape: str = ""          # a name of SHAPES; default: tiny on a CPU, both 1.1B shapes on CUDA
    rows: int = 0            # rows of the DDPO step, 2 per pair (0 here and below: the shape's default)
    seq: int = 0             # tokens per row of the step and the reference pass
    prompt: int = 0          # decode: prompt tokens, image slots included
    new_tokens: int = 0      # decode: tokens generated per run
    warmup: int = 2
    iters: int = 5
    grad_ckpt: bool = False  # also time the step with activation checkpointing
    compile: bool = False
    compare: bool = False    # also transformers' LlamaForCausalLM, imported only then
    lora_rank: int = 0       # also the step with LoRA adapters of this rank (train.py --lora_rank)
    plan: str = ""           # a named config: activation bytes per token at 1 and 2 decoder blocks of its width
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


def median_time(fn, cfg, minus=None):
    """Median seconds of cfg.iters calls of fn after cfg.warmup untimed ones. fn only queues GPU work,
    so the clock stops when the device is done. With `minus`, the median of fn's time less minus's,
    the two timed back to back in each iteration, so that a change of load between them cancels."""
    sync = torch.cuda.synchronize if cfg.device.startswith("cuda") else lambda: None

    def seconds(f):
        sync()
        t0 = time.perf_counter()
        f()
        sync()
        return time.perf_counter() - t0

    for _ in range(cfg.warmup):
        fn()
    return statistics.median(seconds(fn) - (seconds(minus) if minus else 0) for _ in range(cfg.iters))


def inputs(c, vision, rows, length, n_images, g):
    """Random token ids [rows, length] and n_images images (None without vision); with vision, the
    n_query <im_patch> slots follow the first token of each row."""
    ids = torch.randint(0, c.im_patch_id if vision else c.llm.vocab_size, (rows, length), generator=g)
    if not vision:
        return ids, None
    ids[:, 1:1 + c.n_query] = c.im_patch_id
    return ids, torch.randn(n_images, 3, c.vision.img_size, c.vision.img_size, generator=g)


def ddpo_batch(c, vision, rows, seq, device):
    """A micro-batch in data.Batcher.pairs's layout: rows // 2 pairs, chosen rows then rejected rows,
    row r showing image r mod B; a prompt of seq // 4 tokens, then a labelled answer."""
    g, B = torch.Generator().manual_seed(0), rows // 2
    ids, images = inputs(c, vision, rows, seq, B, g)
    labels = ids.masked_fill(torch.arange(seq) < seq // 4, ddpo.IGNORE_INDEX)
    weights = (labels[:, 1:] != ddpo.IGNORE_INDEX).float()  # aligned with logp [T-1], as Batcher's
    batch = {"input_ids": ids, "labels": labels, "weights": weights, "images": images,
             "ref_logps": -torch.rand(rows, seq - 1, generator=g) * weights,
             "image_index": torch.arange(B).repeat(2) if vision else None}
    return {k: v if v is None else v.to(device) for k, v in batch.items()}


def decode_bytes(c, batch, max_len, elem):
    """Bytes one decode step reads: every decoder weight but the embedding table (of which it reads
    `batch` rows) and the whole static KV cache (SDPA reads all max_len slots, the masked ones too)."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer = c.hidden_size * (2 * q + 2 * kv + 3 * c.intermediate_size) + 2 * c.hidden_size
    weights = c.num_hidden_layers * layer + c.hidden_size + c.vocab_size * c.hidden_size
    return (weights + 2 * c.num_hidden_layers * batch * kv * max_len) * elem


@torch.no_grad()
def generate(model, ids, images, n, step, beams=1, compile=False):
    """sample.generate without the tokenizer and its stop tokens (so every run decodes n tokens):
    prefill into a fresh cache, then n - 1 greedy decode steps. Returns the last tokens [B].
    beams > 1: sample.generate_ids's beam search instead (it compiles its own step)."""
    if beams > 1:
        feats = None if images is None else model.encode_images(images)
        never = torch.zeros(model.llm_config.vocab_size, dtype=torch.bool, device=ids.device)
        return sample.generate_ids(model, ids.tolist(), never, feats, n, num_beams=beams, compile=compile)
    B, P = ids.shape
    model.setup_cache(B, P + n)
    try:
        extra = {} if images is None else {"images": images}  # a plain LLaMA takes no images
        logits = model(ids, input_pos=torch.arange(P, device=ids.device), **extra)
        token, pos = logits[:, -1].float().argmax(-1), torch.tensor([P], device=ids.device)
        pad = torch.zeros(B, dtype=torch.long, device=ids.device)  # no row is padded
        for _ in range(n - 1):
            token = step(model, token, pos, pad, None, (0.0, 1.0, 1.0))  # greedy: `seen` is unused
            pos = pos + 1
    finally:
        model.clear_cache()
    return token


def saved_bytes(fn, model):
    """Bytes of the tensors autograd saves for backward while fn() runs: each storage once, the
    model's own weights left out (they are counted as states). Each is held until fn returns, so
    that memory freed meanwhile (a discarded branch of the graph) cannot come back under a counted
    address and go uncounted."""
    weights, seen = {p.untyped_storage().data_ptr() for p in model.parameters()}, {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(s.nbytes() for s in seen.values())


def state_bytes(model):
    """Weights, and for each trained tensor its gradient and AdamW's two moments (its dtype)."""
    return sum(p.numel() * p.element_size() * (4 if p.requires_grad else 1) for p in model.parameters())


def bench_model(label, model, forward, generate_n, set_ckpt, flops, c, vision, cfg, step_only=False):
    """The table rows of one model. forward(ids, images, image_index) -> logits serves the step and
    the reference pass; generate_n(ids, images, n, beams) generates n tokens; set_ckpt(bool) toggles activation
    checkpointing. The model is left in bf16 on CUDA. step_only: the step's rows alone."""
    cuda, tcfg, peak = cfg.device.startswith("cuda"), TrainConfig(stage="ddpo"), peak_flops(cfg.device)
    batch, tokens = ddpo_batch(c, vision, cfg.rows, cfg.seq, cfg.device), cfg.rows * cfg.seq
    fwd = torch.compile(forward) if cfg.compile else forward
    call = lambda ids, images, image_index: fwd(ids, images, image_index)  # forward_loss passes keywords
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=tcfg.lr, fused=cuda)

    def step():
        with autocast(cfg.device):
            loss, _ = forward_loss(call, batch, tcfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, tcfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    rows = []
    model.train()
    for ckpt in (False, True) if cfg.grad_ckpt else (False,):
        set_ckpt(ckpt)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = median_time(step, cfg)

        def saved_forward():
            with autocast(cfg.device):
                forward_loss(call, batch, tcfg)

        rows.append((label + " +grad_ckpt" * ckpt, {
            "step tok/s": tokens / t, "pairs/s": cfg.rows / 2 / t, "MFU": peak and flops / t / peak,
            "step GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            # with --grad_ckpt the checkpoints keep their block inputs out of the hooks' sight: n/a
            "saved MiB": None if ckpt else saved_bytes(saved_forward, model) / 2**20,
            "states MiB": state_bytes(model) / 2**20}))
    set_ckpt(False)
    if step_only:
        return rows
    del opt  # its moments would otherwise sit in memory through the passes below
    model.eval()

    @torch.no_grad()
    def ref():
        with autocast(cfg.device):
            ddpo.token_logps(fwd(batch["input_ids"], batch["images"], batch["image_index"]), batch["labels"])

    res = rows[0][1]
    res["ref tok/s"] = tokens / median_time(ref, cfg)
    dtype = torch.bfloat16 if cuda else torch.float32
    model.to(dtype)  # both sides decode from weights in this dtype, without autocast
    g, n = torch.Generator().manual_seed(1), cfg.new_tokens
    for b in (1, 8):
        ids, images = inputs(c, vision, b, cfg.prompt, b, g)
        ids, images = ids.to(cfg.device), images if images is None else images.to(cfg.device, dtype)
        prefill = lambda: generate_n(ids, images, 1)  # noqa: E731
        steps_per_s = (n - 1) / median_time(lambda: generate_n(ids, images, n), cfg, minus=prefill)
        res[f"dec@{b} tok/s"] = b * steps_per_s
        res[f"dec@{b} GB/s"] = decode_bytes(c.llm, b, cfg.prompt + n, dtype.itemsize) * steps_per_s / 1e9
    ids, images = ids[:1], images if images is None else images[:1]
    t1 = median_time(lambda: generate_n(ids, images, 1, 3), cfg)
    res["beam3@1 tok/s"] = (n - 1) / (median_time(lambda: generate_n(ids, images, n, 3), cfg) - t1)
    return rows


def ours(label, model, c, vision, cfg, step_only=False):
    """Our Muffin or LLaMA through bench_model; returns its rows and its FLOPs per step."""
    step = sample.decode_step  # compiled as sample.generate compiles it
    step = torch.compile(step, mode="reduce-overhead", fullgraph=True) if cfg.compile else step
    if vision:
        forward = lambda ids, images, index: model(ids, images=images, image_index=index)
    else:
        forward = lambda ids, images, index: model(ids)
    flops = train_flops(model, cfg.rows * cfg.seq, cfg.rows // 2 if vision else 0)
    if hasattr(model, "lora"):  # no weight gradients: 4 FLOPs per weight per token, the tower's forward only
        decoder = train_flops(model, cfg.rows * cfg.seq, 0)
        flops = decoder * 2 / 3 + (flops - decoder) / 3
    generate_n = lambda ids, images, n, beams=1: generate(model, ids, images, n, step, beams, cfg.compile)
    set_ckpt = lambda on: setattr(model, "grad_checkpointing", on)
    return bench_model(label, model, forward, generate_n, set_ckpt, flops, c, vision, cfg, step_only), flops


def theirs(label, path, probe, flops, c, cfg):
    """transformers' LlamaForCausalLM on the weights saved in `path`, through bench_model."""
    import transformers  # only here: transformers is no dependency of the project
    transformers.logging.disable_progress_bar()
    hf = transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
    hf.to(cfg.device)
    with torch.no_grad():
        err = ((hf(probe[0]).logits - probe[1]).abs().max() / probe[1].abs().max()).item()
    if err > 1e-2:  # TF32 or kernel differences stay far below; other weights give O(1)
        raise SystemExit(f"transformers did not load our weights: logits differ by {err:.1e} (relative)")
    forward = lambda ids, images, index: hf(input_ids=ids, use_cache=False).logits  # no cache in training
    # generate() compiles its decode step on CUDA by itself; only with --compile here, as ours
    # beams: min_new_tokens keeps an EOS (not a stop token of ours) from ending the search early
    generate_n = lambda ids, images, n, beams=1: hf.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, num_beams=beams,
        min_new_tokens=n if beams > 1 else None, cache_implementation="static", disable_compile=not cfg.compile,
        pad_token_id=0)
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn)
    on, off = ((hf.activation_checkpointing_enable, hf.activation_checkpointing_disable)
               if hasattr(hf, "activation_checkpointing_enable") else
               (hf.gradient_checkpointing_enable, hf.gradient_checkpointing_disable))
    set_ckpt = lambda ckpt: on({"use_reentrant": False}) if ckpt else off()  # non-reentrant, as ours
    return bench_model(label, hf, forward, generate_n, set_ckpt, flops, c, False, cfg)


def run_shape(cfg, compared):
    """The rows of shape cfg.shape (sizes filled in); with --compare, also transformers' and the
    ratios, unless `compared` holds the decoder already (the two 1.1B shapes share it)."""
    c, vision, _ = SHAPES[cfg.shape]
    compare = cfg.compare and repr(c.llm) not in compared
    compared.add(repr(c.llm))
    runs = [(cfg.shape, vision, False)]  # (label, with the tower, with adapters)
    runs += [(f"{cfg.shape} +lora{cfg.lora_rank}", vision, True)] if cfg.lora_rank else []
    runs += [(f"{cfg.shape} decoder", False, False)] if compare and vision else []
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, v, adapters in runs:
            torch.manual_seed(0)
            with torch.device(cfg.device):  # random weights made on the device, not copied there
                model = (Muffin(c) if v else LLaMA(c.llm)).init_weights()
            if adapters:  # as train.py --lora_rank: the frozen base in bf16 on CUDA, fp32 adapters
                model = lora.apply(model.to(torch.bfloat16) if cfg.device.startswith("cuda") else model,
                                   cfg.lora_rank, 16.0, 0.0)
                table += ours(f"ours {name}", model, c, v, cfg, step_only=True)[0]
                del model
                gc.collect()
                continue
            if compare and not v:  # the weights transformers will load, and logits to check them by
                model.save_pretrained(tmp)
                ids = torch.randint(0, c.llm.vocab_size, (1, 16), device=cfg.device)
                with torch.no_grad():
                    probe = ids, model(ids)
            rows, flops = ours(f"ours {name}", model, c, v, cfg)
            table += rows
            # free the model and all that holds it, so that the next model's peak memory is its own
            del model
            torch.compiler.reset()  # compiled graphs keep the modules they were traced from
            gc.collect()
            if cfg.device.startswith("cuda"):
                torch.cuda.empty_cache()
        if compare:
            hf_rows = theirs(f"transformers {cfg.shape}", tmp, probe, flops, c, cfg)
            table += hf_rows + [(f"ours/transformers{' +grad_ckpt' * ckpt}",
                                 {k: a[k] / b[k] if a.get(k) and b.get(k) else None for k in COLUMNS})
                                for ckpt, ((_, a), (_, b)) in enumerate(zip(rows, hf_rows))]
    return table


def plan(cfg):
    """The bytes autograd saves per token, measured at the width of the named config on models of
    1 and 2 decoder blocks (and 1 and 2 tower blocks), as a CUDA step holds them: bf16 weights,
    bf16 autocast. Full training (every weight trains) beside LoRA (--lora_rank, frozen base and
    tower; dropout 0 and 0.05). The per-block difference is what each further block adds; what is
    left at one block is the head's (and the tower's). Scaled to the full depth in docs/one-gpu.md."""
    c0, rows, seq = CONFIGS[cfg.plan], cfg.rows or 2, cfg.seq or 256
    tcfg = TrainConfig(stage="ddpo")

    def measure(layers, depth, rank, dropout):
        c = replace(c0, llm=replace(c0.llm, num_hidden_layers=layers), vision=replace(c0.vision, depth=depth),
                    im_patch_id=c0.llm.vocab_size - 1)
        torch.manual_seed(0)
        model = Muffin(c).init_weights().to(torch.bfloat16)
        if rank:
            lora.apply(model, rank, 16.0, dropout)
        batch = ddpo_batch(c, True, rows, seq, "cpu")
        call = lambda ids, images, image_index: model(ids, images=images.bfloat16(), image_index=image_index)

        def fwd():
            with torch.autocast("cpu", torch.bfloat16):
                forward_loss(call, batch, tcfg)

        return saved_bytes(fwd, model)

    n, images, out = rows * seq, rows // 2, {}
    for label, rank, dropout in (("full", 0, 0.0), (f"lora{cfg.lora_rank}", cfg.lora_rank, 0.0),
                                 (f"lora{cfg.lora_rank} dropout 0.05", cfg.lora_rank, 0.05)):
        if rank == 0 and label != "full" or (label.endswith("0.05") and not rank):
            continue
        s11, s21, s12 = measure(1, 1, rank, dropout), measure(2, 1, rank, dropout), measure(1, 2, rank, dropout)
        block, img = (s21 - s11) / n, (s12 - s11) / images
        out[label] = {"a (B/token/block)": block, "a_img (MiB/image/tower block)": img / 2**20,
                      "a_head (B/token)": (s11 - block * n - img * images) / n}
        print(f"{label}: " + ", ".join(f"{k} {v:,.1f}" for k, v in out[label].items()), flush=True)
    return out


def format_table(table):
    """Rows (label, {column: number or None}) as text: labels left, numbers right-aligned."""
    fmt = lambda label, k, v: ("n/a" if v is None else f"{v:.2f}x" if label.startswith("ours/") else
                               f"{v:.1%}" if k == "MFU" else f"{v:,.0f}" if v >= 100 else f"{v:.3g}")
    cells = [["model", *COLUMNS]] + [[lab] + [fmt(lab, k, r.get(k)) for k in COLUMNS] for lab, r in table]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join(row[0].ljust(widths[0]) + "".join(s.rjust(w + 2) for s, w in zip(row[1:], widths[1:]))
                     for row in cells)


def main(argv):
    cfg = cli.parse_args(BenchConfig, argv)
    if cfg.plan:
        if cfg.plan not in CONFIGS:
            raise cli.UsageError(f"--plan={cfg.plan}: valid: {' '.join(CONFIGS)}")
        print(f"{cfg.plan} at 1-2 blocks, {cfg.rows or 2} rows x {cfg.seq or 256} tokens, bf16 weights and autocast, "
              f"torch {torch.__version__}")
        return plan(cfg)
    cuda = cfg.device.startswith("cuda")
    shapes = [cfg.shape] if cfg.shape else ["llama-1.1b", "llama-1.1b-mm"] if cuda else ["tiny"]
    if any(s not in SHAPES for s in shapes):
        raise cli.UsageError(f"unknown --shape={cfg.shape}; valid: {' '.join(SHAPES)}")
    if cfg.compare and importlib.util.find_spec("transformers") is None:
        raise cli.UsageError("--compare needs transformers (pip install transformers); it is no dependency")
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{device}, torch {torch.__version__}, {'bf16 autocast' if cuda else 'fp32'}; "
          f"median of {cfg.iters} runs after {cfg.warmup} warm-up runs")
    compared, table = set(), []
    for shape in shapes:
        c = replace(cfg, shape=shape, **{k: getattr(cfg, k) or v for k, v in SHAPES[shape][2].items()})
        if c.rows % 2:
            raise cli.UsageError(f"--rows must be even (chosen rows, then as many rejected rows), not {c.rows}")
        print(f"{shape}: step {c.rows} rows x {c.seq} tokens; decode {c.prompt} + {c.new_tokens} tokens")
        table += run_shape(c, compared)
    print(format_table(table))


if __name__ == "__main__":
    cli.run(main)
