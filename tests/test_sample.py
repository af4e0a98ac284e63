"""sample.generate: batched, left-padded, KV-cached decoding equals naive recomputation."""
import json

import torch
from PIL import Image

import sample
from data import STOP, image_tensor, prompt_ids
from model import Muffin, sized


def naive_greedy(model, tok, image, question, n):
    """One row, no cache, no padding: the whole sequence recomputed for every new token."""
    ids = prompt_ids(tok, question, model.config.n_query)
    out = []
    for _ in range(n):
        logits = model(torch.tensor([ids + out]), images=image[None])[0, -1]
        out.append(int(logits.argmax()))
    return out


def test_batched_cached_generation_equals_recomputation(tok, dataset):
    """Prompts of different lengths in one batch (left-padded, pad slots masked, KV cache, decode
    steps of one token) give each row exactly the greedy tokens of a naive loop over that row alone,
    cut at the first stop token."""
    torch.manual_seed(0)
    model = Muffin(sized("tiny", tok.vocab_size, tok.im_patch_id)).init_weights().eval()
    images = torch.stack([image_tensor(Image.open(dataset / "images" / f"{i}.png").convert("RGB"), 32)
                          for i in range(3)])
    questions = ["Describe this image in detail.", "What colour is the square?", "How many?"]
    answers = sample.generate(model, tok, images, questions, max_new_tokens=12)
    for image, q, a in zip(images, questions, answers):
        with torch.no_grad():
            want = tok.decode(naive_greedy(model, tok, image, q, 12)).split(STOP)[0].strip()
        assert a == want


def test_sampling_respects_top_p_and_repetition_penalty():
    """top_p keeps the smallest set reaching p (here the top token alone); the repetition penalty
    divides a seen token's positive logit, which can flip the greedy choice."""
    logits = torch.tensor([[3.0, 2.9, -5.0]])
    seen = torch.tensor([[True, False, False]])
    assert sample.next_token(logits, seen, 0.0, 1.0, 1.0).item() == 0
    assert sample.next_token(logits, seen, 0.0, 1.0, 1.1).item() == 1  # 3.0 / 1.1 < 2.9
    torch.manual_seed(0)
    draws = {sample.next_token(logits, ~seen, 1.0, 0.4, 1.0).item() for _ in range(50)}
    assert draws == {0}
    draws = {sample.next_token(logits, ~seen, 1.0, 1.0, 1.0).item() for _ in range(200)}
    assert draws == {0, 1}


def test_main_prompts_with_the_bos_the_checkpoints_files_name(tok, dataset, init_ckpt, monkeypatch):
    """sample.py reads the checkpoint's special_tokens_map.json: with BOS = "</s>" (Muffin's v0
    script) the prompt starts with id 2, as in training; without the file with <s> (1)."""
    firsts, forward = [], Muffin.forward
    monkeypatch.setattr(Muffin, "forward", lambda m, ids, **kw: firsts.append(int(ids[0, 0])) or forward(m, ids, **kw))
    args = [f"--ckpt={init_ckpt}", f"--image={dataset / 'images' / '0.png'}", "--device=cpu", "--max_new_tokens=1"]
    sample.main(args)
    with open(init_ckpt / "special_tokens_map.json", "w") as f:
        json.dump({"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "[PAD]"}, f)
    sample.main(args)
    assert firsts == [1, 2]  # one prefill each: a single new token needs no decode step
