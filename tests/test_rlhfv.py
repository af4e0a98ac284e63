"""The miniature RLHF-V end to end, at toy sizes: every stage runs and writes its artefacts; the
evaluation decodes greedily unless told to decode as RLHF-V did."""
import json
import os

import rlhfv
import train
import world


def test_miniature_runs_every_stage_and_writes_every_artefact(tmp_path):
    """world + tokenizer -> vision pre-training -> SFT -> collect + correct -> DDPO, vanilla DPO and SFT on
    the corrected answers -> evaluation -> results.json and report.png; a second call finds every
    stage finished and only rewrites the report."""
    cfg = train.TrainConfig(out_dir=str(tmp_path), model="tiny", image_size=32, n_train=64, n_test=8,
                            vision_steps=20, sft_steps=150, sft_lr=3e-3, steps=2, batch_size=4, log_every=1,
                            device="cpu", ablation=True)
    rlhfv.run(cfg)
    for f in ("world/tokenizer.model", "world/sft.jsonl", "world/images/test7.png", "vision/config.json",
              "sft/config.json",
              "collect/pairs.jsonl", "collect/ref_logps.safetensors", "ddpo/model.safetensors",
              "dpo/model.safetensors", "sft_corrected/model.safetensors", "ddpo/eval.json",
              "report.png"):
        assert (tmp_path / f).exists(), f
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"sft", "ddpo", "dpo", "sft_corrected"}
    assert {"response_rate", "mention_rate", "coverage", "object", "attribute", "count",
            "relation"} <= set(results["ddpo"]) and results["ddpo"]["n"] == 8
    stamp = (tmp_path / "ddpo" / "model.safetensors").stat().st_mtime_ns
    rlhfv.run(cfg)
    assert (tmp_path / "ddpo" / "model.safetensors").stat().st_mtime_ns == stamp


def test_paper_decoding_evaluates_with_rlhfvs_beams(tmp_path, tok, init_ckpt, monkeypatch):
    """Held-out answers are greedy by default; --paper_decoding (one option, for every arm) gives
    them by RLHF-V's 3 beams and repetition penalty 1.1, cached apart from the greedy ones."""
    _, scenes = world.make_world(0, 0, 2)
    os.makedirs(tmp_path / "world" / "images")
    for i, scene in enumerate(scenes):
        world.render(scene, 32).save(tmp_path / "world" / "images" / f"test{i}.png")
    calls, generate = [], rlhfv.generate
    monkeypatch.setattr(rlhfv, "generate", lambda *args, **kw: calls.append(kw) or generate(*args, **kw))
    for paper in (False, True):
        rlhfv.evaluate(train.TrainConfig(out_dir=str(tmp_path), device="cpu", paper_decoding=paper), tok,
                       str(init_ckpt), scenes)
    assert calls == [{"max_new_tokens": 96},
                     {"max_new_tokens": 96, "num_beams": 3, "repetition_penalty": 1.1}]
    assert (init_ckpt / "eval.json").exists() and (init_ckpt / "eval_paper_decoding.json").exists()
