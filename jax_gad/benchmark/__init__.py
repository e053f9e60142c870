"""Throughput benchmark: ``python -m jax_gad.benchmark [--flags] [--json=FILE]``.

The package has one room per step: :mod:`.measure` times each stage,
:mod:`.densities`, :mod:`.maps` and :mod:`.engines` the optional density,
map and engine-comparison sections,
:mod:`.estimate` turns the rates into a full-protocol estimate, :mod:`.run`
holds the settings and runs each section (one small function per section,
:data:`.run.SECTIONS`), :mod:`.report` formats each section's table (one
function per section, :data:`.report.SECTIONS`) and :mod:`.cli` is the
command line.

Measures, on whatever devices JAX sees:

* feature extraction: images/s of the sharded level extractor
  (:class:`jax_gad.features.LevelExtractor`, all 9 levels pooled on device) for
  every (batch size, dtype, depthwise implementation), with the compile time
  reported apart from the steady-state step time, and, when ``torch`` and
  ``efficientnet_pytorch`` import, ``EfficientNet.extract_features`` on the
  same input size and batch in the same run (ratio = JAX img/s / torch img/s);
  with ``--versus_rounds=R``, both timed batch by batch in alternation over R
  rounds, so that other processes' load falls on both alike (each turn runs
  one untimed batch first: the steady state is compared);
* with ``--engines_rounds=R`` (:mod:`.engines`), for each of
  ``--engines_archs``: jax_gad, ONNX Runtime, OpenVINO and PyTorch eager
  extracting the 9 pooled levels with the same weights, checked against
  PyTorch first, then timed in alternation over R rounds;
* the Gaussian kernels per level width of the architecture: fit (mean,
  Ledoit-Wolf covariance, precision factor, std) on ``N`` rows and scoring of
  ``M`` rows with L2, SED and Mahalanobis, against scikit-learn's
  ``LedoitWolf`` plus numpy scoring when scikit-learn imports;
* sweeps of the fit over the feature width ``D`` and the sample count ``N``;
* an end-to-end estimate of the full MVTec AD protocol (15 categories x 5
  folds, 9 levels, 3 distances) from the measured per-image and per-fit costs;
* optionally (``--density_bench``) the fit time per level width of every
  density model (Gaussian, GMM with scikit-learn's ``GaussianMixture`` in the
  same run, flow with and without vmapping the levels), N = 200 and 2,000;
* peak host memory (``ru_maxrss``) and device memory where JAX reports it.

Random weights are used throughout (speed does not depend on the values), so
no checkpoint is needed; the engines section alone uses the ImageNet weights
that the Lite0-2 packages ship. torch, onnx, onnxruntime, openvino and
scikit-learn are imported lazily, only when their comparison runs. Accuracy
studies (bfloat16 vs float32 features and AUROC with real weights, the
calibrated threshold's false-positive rate) are scripts in ``experiments/``
(``feature_difference.py``, ``calibration_study.py``).

JSON fields (``--json=FILE``, written atomically):

``schema``: ``"jax_gad.benchmark/1"``.
``machine``: ``hostname``, ``platform``, ``processor``, ``cpu_model``, ``cpu_count``,
  ``python``, ``jax``, ``jaxlib``, ``backend``, ``device_kind``,
  ``device_count``, ``local_device_count``, ``process_count``, ``torch``
  (version or null), ``sklearn`` (version or null), ``load_average_start`` and
  ``load_average_end`` (1, 5, 15 minute host load averages around the run;
  other processes on the machine skew the timings), ``git_commit`` (HEAD of
  the checkout, or null).
``config``: the flag values used.
``extraction``: list of rows, one per (batch_size, dtype, depthwise):
  ``arch``, ``image_size``, ``batch_size``, ``dtype``, ``depthwise``,
  ``device_count``, ``compile_s``, ``step_s`` (median seconds per global
  batch, host->device transfer and pooled result back included), ``step_s_all``,
  ``images_per_s``, ``num_batches``, ``compiled_memory`` (XLA's
  ``memory_analysis``: ``argument_bytes``, ``output_bytes``, ``temp_bytes``,
  ``generated_code_bytes``, or null), ``device_peak_bytes`` (null on CPU),
  ``other_cpu`` (share of all cores used by other processes during the timed
  steps: 0 = otherwise idle machine; null off Linux or for intervals under
  1 s),
  ``torch_images_per_s`` (the torch row at the same batch size, or null),
  ``speedup_vs_torch`` (``images_per_s / torch_images_per_s`` or null).
``torch``: list of rows ``arch``, ``image_size``, ``batch_size``, ``threads``,
  ``other_cpu``, ``step_s``, ``step_s_all``, ``images_per_s``, ``num_batches``; empty when
  skipped (``torch_skipped`` says why).
``kernel``: ``n_fit``, ``n_score``, ``levels`` (one row per width of
  ``--kernel_widths``, by default the 9 level widths of ``--arch``: ``level``,
  ``width``, ``jax_compile_s``, ``jax_fit_s``, ``jax_score_s`` (dict per
  distance), ``jax_score_total_s``, ``sklearn_fit_s``, ``numpy_score_total_s``,
  ``fit_speedup``, ``score_speedup``), ``total`` (sums over levels, the
  overall ratios and ``other_cpu``); null when disabled.
``sweep_d`` / ``sweep_n``: lists of rows ``n``, ``d``, ``jax_compile_s``,
  ``jax_fit_s``, ``sklearn_fit_s``, ``fit_speedup``; ``sweeps_other_cpu``
  covers both sweeps.
``host_preprocess_s_per_image``: seconds to decode a PNG of side
  ``--host_image_side`` and resize + normalise it to the input size (one thread).
``pipeline``: null, or the end-to-end run of ``pooled_features`` over
  ``n_images`` in-memory PNGs of ``side`` pixels decoded by ``num_workers``
  threads while the device computes (fastest float32 extraction row):
  ``batch_size``, ``dtype``, ``depthwise``, ``wall_s``, ``images_per_s``,
  ``device_only_images_per_s``, ``other_cpu``.
``predict_calls``: null, or (``--predict_calls=N``) whole ``python -m
  jax_gad.predict`` processes on synthetic PNGs with the real ``--arch``
  weights, 1 image and N images, each first with an empty and then with a
  warm compile cache, best of ``--repeats``
  (:func:`jax_gad.benchmark.predict_calls.measure_predict_calls` lists the fields).
``pipelines``: one row per (architecture of ``--pipeline_archs``, batch size),
  at ``--image_size`` or else each architecture's native input size: the
  ``pipeline`` fields plus ``arch`` and ``image_size``; empty when not requested.
``versus``: null, or (``--versus_rounds`` > 0 with torch) jax_gad and
  efficientnet-pytorch float32 extraction timed in alternation, each turn one
  untimed batch then one timed: ``arch``, ``image_size``, ``depthwise``,
  ``threads``, ``rounds``, ``other_cpu``, ``rows`` (per batch size:
  ``batch_size``, ``images_per_s``, ``torch_images_per_s``,
  ``speedup_vs_torch`` (median of the per-round ratios),
  ``first_call_images_per_s``, ``torch_first_call_images_per_s`` (the untimed
  first batch of each turn), ``step_s_all``, ``torch_step_s_all``,
  ``first_step_s_all``, ``torch_first_step_s_all``).
``engines``: null, or (``--engines_rounds`` > 0) one entry per architecture of
  ``--engines_archs``, at ``--image_size`` or else its native size, the four
  engines (``jax_gad``, ``onnxruntime``, ``openvino``, ``pytorch``) on the same
  weights: ``arch``, ``image_size``, ``weights`` (``ImageNet (file)`` for
  Lite0-2, else ``random (torch seed S...)``), ``rounds``, ``threads``
  (``--torch_threads``, 0 = all cores), ``tolerance``, ``settings`` (per
  engine: ``version`` (distribution -> version), ``precision``, ``layout``
  and ``threads``, plus jax_gad's ``depthwise``, ``split_bytes`` and
  ``devices``, ONNX Runtime's ``provider``, ``inter_op_threads``,
  ``graph_optimization_level``, ``execution_mode`` and ``opset``, OpenVINO's
  ``device``, ``INFERENCE_NUM_THREADS``, ``PERFORMANCE_HINT``,
  ``INFERENCE_PRECISION_HINT``, ``compiled_precision`` (read back) and
  ``shape``, PyTorch's ``mode``), ``max_rel_error`` (per engine but PyTorch:
  the worst level's ``max |a - b| / max |b|`` against PyTorch over the batch
  sizes), ``other_cpu`` (during the alternation) and ``rows`` (per batch
  size: ``batch_size``, ``images_per_s``, ``first_call_images_per_s``,
  ``step_s_all``, ``first_step_s_all`` and ``max_rel_error``, each a dict per
  engine, and ``jax_gad_ratio`` (per other engine: the median over the
  rounds of its step time / jax_gad's)). ``engines_skipped``: null, or why
  the section did not run although asked for (a package not importable).
``estimate``: the full-protocol estimate: ``dataset``, ``categories``,
  ``folds``, ``levels``, ``distances``, ``images``, ``fits``, ``scorings``,
  ``images_per_s``, ``pipeline_images_per_s`` (used for the image part when
  measured), ``extraction_row`` (batch/dtype/depthwise used),
  ``compile_s``, ``extraction_s``, ``host_preprocess_s``, ``fit_s``,
  ``score_s``, ``total_s``, ``total_min``, ``assumptions`` (text); null when
  its inputs were not measured.
``predict``: null unless ``--predict_images``; then ``arch``, ``n_images``,
  ``side``, ``image_size``, ``batch_size``, ``num_workers``, ``images_per_s``
  (``jax_gad.predict`` over PNG files) and ``latency_s`` (one image, batch 1).
``maps``: null unless ``--map_fit``; then ``memory`` and ``speed`` rows
  (:mod:`jax_gad.benchmark.maps`).
``densities``: null unless ``--density_bench``; then ``rows`` (one per (N, width,
  density): ``n``, ``width``, ``density``, ``compile_s``, ``fit_s``, and
  ``per_iter_s``, ``sklearn_fit_s``, ``sklearn_per_iter_s``,
  ``speedup_vs_sklearn`` for the GMM or ``epochs``, ``per_epoch_s`` for the
  flow, or ``error``), ``flow_vmap`` (per N: ``loop_fit_s``, ``vmap_compile_s``,
  ``vmap_fit_s``, ``vmap_speedup``), ``settings`` and ``other_cpu``
  (:mod:`jax_gad.benchmark.densities`).
``torch_skipped`` / ``sklearn_skipped`` / ``kernel_skipped``: null, or why
  that comparison or part did not run.
``peak_host_memory_mb``: ``ru_maxrss`` of this process at the end, and
  ``peak_host_memory_mb_after`` per phase (``extraction``, ``torch``,
  ``kernel``, ``sweeps``, ``predict``, ``densities``, ``engines``).
``wall_s``: total run time.
"""

from jax_gad.benchmark.report import format_report, write_json
from jax_gad.benchmark.run import SCHEMA, Config, run_benchmark

__all__ = ["SCHEMA", "Config", "format_report", "run_benchmark", "write_json"]
