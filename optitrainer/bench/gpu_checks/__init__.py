"""The pieces of ``python -m optitrainer.bench.gpu_check`` (see :mod:`optitrainer.bench.gpu_check`).

* :mod:`.plan`: what runs (the seed guide's optimizers, their transformers baselines, the exactness
  checks), with which settings on a GPU and in the dry run;
* :mod:`.weights`: the model, built once, handed out as fresh copies with the same weights;
* :mod:`.train`: one (optimizer, trainer) run: step times, allocator peak, analytic floor, losses;
* :mod:`.verify`: what a training row must show (the loss fell, 8-bit or paged states, peak >= floor);
* :mod:`.exactness`: clipping under bf16 autocast, fused AdamW and AdaLomo against their references;
* :mod:`.budget`: the global deadline and each row's limit;
* :mod:`.table`: the rows, as a terminal table, Markdown and JSON.
"""
