"""The miniature RLHF-V end to end, at toy sizes: every stage runs and writes its artefacts."""
import json

import rlhfv
import train


def test_miniature_runs_every_stage_and_writes_every_artefact(tmp_path):
    """world + tokenizer -> vision pre-training -> SFT -> collect + correct -> DDPO, vanilla DPO and SFT on
    the corrected answers -> evaluation -> results.json and report.png; a second call finds every
    stage finished and only rewrites the report."""
    cfg = train.TrainConfig(out_dir=str(tmp_path), model="tiny", image_size=32, n_train=64, n_test=8,
                            vision_steps=20, sft_steps=150, sft_lr=3e-3, steps=2, batch_size=4, log_every=1,
                            device="cpu", ablation=True)
    rlhfv.run(cfg, train.train)
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
    rlhfv.run(cfg, train.train)
    assert (tmp_path / "ddpo" / "model.safetensors").stat().st_mtime_ns == stamp
