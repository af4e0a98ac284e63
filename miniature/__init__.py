"""The embedded demonstration: RLHF-V in miniature on a synthetic world where every hallucination
can be counted. `python train.py` runs it; the library at the top level never imports it.

    world.py   scenes, the careless captioner, the parser/checker, the annotator, the scorer
    rlhfv.py   the stages: world -> vision -> SFT -> (collect + correct -> DDPO) x rounds -> evaluation
    report.py  the printed table, results.json, report.png, report.html, the sweep's summary
"""
