"""``esrfarm compare``: choose a model by evidence, measured on the user's own video.

Library use (the job service runs a comparison as a job type this way)::

    from compare.spec import CompareSpec
    from compare.run import run_comparison
    from compare.report import write_report

    spec = CompareSpec(Path("in.mp4"), models=("realesr-animevideov3", "bicubic"), scale=2)
    report = run_comparison(spec, progress=print)
    write_report(report, Path("report.html"), Path("report.json"))

:mod:`compare.spec` (the spec, its validation, the errors) imports neither torch nor the model
runtime, so a service can build and check specs cheaply; :mod:`compare.run` loads the models.
"""
