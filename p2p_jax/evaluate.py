"""Evaluation and translation with a restored generator (``--mode=eval``, ``--mode=translate``).

Test-time behaviour (``config.eval.mode``), as in the official ``test.py``:

* ``'paper'`` (default): batch-norm statistics of the test image and active dropout. The
  official ``test.py`` forces batch size 1, so the statistics are those of one image. Here
  every example is run as its own batch of one (``jax.vmap`` over the batch), so the results
  are the official batch-1 results whatever ``config.eval.batch_size`` or the device count.
* ``'eval'``: running averages and no dropout; deterministic.

Randomness: the dropout key of sample ``k`` of example ``i`` (its position in the split, or in
the sorted input folder) is ``fold_in(fold_in(PRNGKey(config.seed), k), i)``. The same seed
gives the same samples, on any number of devices and with any batch size.

Every process computes everything (evaluation is small); only process 0 writes files.
"""
import html
import io
import json
import os
import urllib.parse
from typing import Callable, Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from p2p_jax import checkpointing, datasets, fid, images, metrics, models, parallel

def restore_generator(config: ml_collections.ConfigDict, workdir: str, mesh):
  """Builds the generator and restores its ``{'params', 'batch_stats'}``, replicated on ``mesh``.

  Args:
    config: the run config (``config.model``, ``config.eval.step``, see ``checkpoint_step``).
    workdir: the run's workdir, holding ``checkpoints/``.
    mesh: the device mesh.

  Returns:
    (generator module, variables, checkpoint step).
  """
  data = config.data
  generator = models.create_generator(config.model, data.output_nc,
                                      models.compute_dtype(config.compute_dtype))
  shape = (1, data.crop_size, data.crop_size, data.input_nc)
  abstract = jax.eval_shape(
      lambda: models.init_variables(generator, jax.random.PRNGKey(0), shape))
  variables, step = checkpointing.restore_generator(
      workdir, abstract, parallel.replicated_sharding(mesh), checkpoint_step(config),
      config.eval.best_metric)
  logging.info('Restored the generator from step %d of %s', step, workdir)
  return generator, variables, step


def checkpoint_step(config: ml_collections.ConfigDict):
  """``config.eval.step`` as ``restore_generator`` takes it: None (latest), 'best' or a step.

  Raises:
    ValueError: naming the option, for anything but 'latest', -1, 'best' or a step number.
  """
  value = str(config.eval.step).strip()
  if value in ('latest', '-1'):
    return None
  if value == 'best':
    return 'best'
  if not value.isdigit():
    raise ValueError(f"config.eval.step={config.eval.step!r}: must be 'latest', 'best' or a "
                     'checkpoint step.')
  return int(value)


def make_generate_fn(generator, mode: str, seed: int, mesh):
  """A jitted ``fn(variables, images, ids) -> fakes`` that runs each example as a batch of one.

  Args:
    generator: the generator module.
    mode: ``'paper'`` or ``'eval'`` (see the module docstring).
    seed: ``config.seed``; dropout keys derive from it.
    mesh: the device mesh; the result is replicated on it.

  Returns:
    The function. ``images`` is ``(N, H, W, input_nc)`` in [-1, 1]; ``ids`` is ``(N, 2)`` int32
    rows ``(sample, example index)`` that pick each example's dropout key. The result is
    ``(N, H, W, output_nc)`` float32 in [-1, 1].
  """
  models.check_eval_mode(mode)

  def one(variables, image, ids):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), ids[0]), ids[1])
    return models.generate(generator, variables, image[None], key, mode)[0]

  def fn(variables, images, ids):
    return jax.vmap(one, in_axes=(None, 0, 0))(variables, images, ids)

  return jax.jit(fn, out_shardings=parallel.replicated_sharding(mesh))


def run_batch(generate_fn, variables, inputs: np.ndarray, sample: int, indices, batch_size: int,
              mesh) -> np.ndarray:
  """Generates ``inputs`` (at most ``batch_size``), padding to ``batch_size`` for sharding.

  Padding cannot change the other results: each example is its own batch of one.

  Args:
    generate_fn: from ``make_generate_fn``.
    variables: the generator variables.
    inputs: ``(n, H, W, input_nc)`` float32 in [-1, 1], ``n <= batch_size``.
    sample: the sample number (for the dropout keys).
    indices: the ``n`` example indices (for the dropout keys).
    batch_size: the padded batch size, a multiple of the device count.
    mesh: the device mesh.

  Returns:
    ``(n, H, W, output_nc)`` float32 numpy in [-1, 1].
  """
  n = len(inputs)
  pad = batch_size - n
  inputs = np.concatenate([inputs, np.repeat(inputs[-1:], pad, axis=0)])
  ids = np.array([(sample, i) for i in list(indices) + [indices[-1]] * pad], np.int32)
  # Every process holds the whole batch, so each device takes its slice from it.
  out = generate_fn(variables, *parallel.shard_replicated_batch((inputs, ids), mesh))
  return np.asarray(out)[:n]


def _save_png(image: Image.Image, path: str) -> None:
  """Writes a PNG to a local path or a bucket URI (``gs://...``)."""
  buffer = io.BytesIO()
  image.save(buffer, format='PNG')
  epath.Path(path).write_bytes(buffer.getvalue())


def _add_unique(seen: set, name: str, what: str) -> None:
  """Adds ``name`` to ``seen``; two outputs of one name would overwrite each other."""
  if name in seen:
    raise ValueError(f'Two {what} are both named {name!r}; their outputs would overwrite '
                     'each other. Rename one.')
  seen.add(name)


def fake_names(name: str, num_samples: int) -> list:
  """The file names of an example's fakes: ``{name}_fake_B.png`` or ``{name}_fake_B_{k}.png``."""
  if num_samples == 1:
    return [f'{name}_fake_B.png']
  return [f'{name}_fake_B_{k}.png' for k in range(num_samples)]


def write_results_page(path: str, title: str, summary: str, names, num_samples: int) -> None:
  """An offline ``index.html`` like the official one: a row per example, input | outputs | target.

  Args:
    path: where to write it; the images are in ``images/`` next to it.
    title: the page heading.
    summary: a line under the heading (the metrics).
    names: the example names, in order.
    num_samples: fakes per example.
  """
  def img(file_name):
    src = html.escape('images/' + urllib.parse.quote(file_name))
    return f'<td><img src="{src}" width="256"></td>'

  fake_headers = ''.join(f'<th>fake_B{"" if num_samples == 1 else f" #{k}"}</th>'
                         for k in range(num_samples))
  rows = []
  for name in names:
    cells = [img(f'{name}_real_A.png')] + [img(f) for f in fake_names(name, num_samples)]
    cells.append(img(f'{name}_real_B.png'))
    rows.append(f'<tr><td>{html.escape(name)}</td>{"".join(cells)}</tr>')
  page = (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}'
          '</title>\n<style>body{font-family:sans-serif} td,th{padding:4px;text-align:center}'
          '</style></head>\n<body>\n'
          f'<h3>{html.escape(title)}</h3>\n<p>{html.escape(summary)}</p>\n<table>\n'
          f'<tr><th>name</th><th>real_A</th>{fake_headers}<th>real_B</th></tr>\n'
          + '\n'.join(rows) + '\n</table>\n</body></html>\n')
  epath.Path(path).write_text(page, encoding='utf-8')


def _generate_split(dataset, generate_fn, variables, num_samples: int, batch_size: int, mesh,
                    max_examples: int = -1):
  """Yields ``(example, [fake_B of each sample])`` over the first ``max_examples`` of
  ``dataset`` (-1: all), batch by batch."""
  size = len(dataset) if max_examples < 0 else min(max_examples, len(dataset))
  for start in range(0, size, batch_size):
    batch = [(i, dataset[i]) for i in range(start, min(start + batch_size, size))]
    batch = [(i, e) for i, e in batch if e is not None]  # None: skipped by skip_bad_images.
    if not batch:
      continue
    indices = [i for i, _ in batch]
    real_a = np.stack([e['A'] for _, e in batch])
    fakes = [run_batch(generate_fn, variables, real_a, k, indices, batch_size, mesh)
             for k in range(num_samples)]
    for j, (_, example) in enumerate(batch):
      yield example, [fake[j] for fake in fakes]


def _write_example(image_dir: str, name: str, real_a, fakes, real_b) -> np.ndarray:
  """Writes an example's PNGs; returns its real_A | fake_B | real_B row (RGB uint8)."""
  a_u8, b_u8 = images.to_uint8(real_a), images.to_uint8(real_b)
  fakes_u8 = [images.to_uint8(fake) for fake in fakes]
  _save_png(images.to_pil(a_u8), os.path.join(image_dir, f'{name}_real_A.png'))
  _save_png(images.to_pil(b_u8), os.path.join(image_dir, f'{name}_real_B.png'))
  for file_name, fake_u8 in zip(fake_names(name, len(fakes)), fakes_u8):
    _save_png(images.to_pil(fake_u8), os.path.join(image_dir, file_name))
  return images.grid([[a_u8, fakes_u8[0], b_u8]])


def score_split(dataset, generate_fn, variables, num_samples: int, batch_size: int, mesh,
                max_examples: int = -1, on_example: Optional[Callable] = None,
                feature_fn: Optional[Callable] = None) -> dict:
  """The mean image metrics of the generator over (the first ``max_examples`` of) a split.

  Args:
    dataset: the split, from ``input_pipeline.create_eval_dataset``.
    generate_fn: from ``make_generate_fn`` (its mode and seed fix the samples).
    variables: the generator variables.
    num_samples: fakes per example.
    batch_size: examples per call, a multiple of the device count.
    mesh: the device mesh.
    max_examples: -1 for the whole split.
    on_example: called as ``on_example(example, fakes)`` for each example, in order.
    feature_fn: ``fid.load_feature_fn``'s Inception features, or None (no FID / KID).

  Returns:
    ``{'L1', 'PSNR', 'SSIM'}`` averaged over all examples and samples (NaN for an empty
    split), and with ``feature_fn`` ``FID``, ``KID_mean``, ``KID_std`` of all fakes against
    the real targets, on the uint8 images as written to disk.
  """
  sums, count = {'L1': 0.0, 'PSNR': 0.0, 'SSIM': 0.0}, 0
  real_u8, fake_u8 = [], []
  for example, fakes in _generate_split(dataset, generate_fn, variables, num_samples,
                                        batch_size, mesh, max_examples):
    for fake in fakes:
      for key, value in metrics.image_metrics(fake, example['B']).items():
        sums[key] += value
      count += 1
    if feature_fn is not None:
      real_u8.append(images.to_uint8(example['B']))
      fake_u8.extend(images.to_uint8(fake) for fake in fakes)
    if on_example is not None:
      on_example(example, fakes)
  scores = {key: value / count if count else float('nan') for key, value in sums.items()}
  if feature_fn is not None and count:
    fid_kid = fid.fid_and_kid(feature_fn, real_u8, fake_u8)
    scores.update(FID=fid_kid['fid'], KID_mean=fid_kid['kid_mean'], KID_std=fid_kid['kid_std'])
  return scores


def make_validation(config: ml_collections.ConfigDict, generator, mesh, source):
  """``validate(variables) -> metrics`` on ``config.data.eval_split``, as ``--mode=eval`` scores.

  ``config.eval.mode`` and ``config.seed`` fix the dropout keys, so every validation of a run
  (and of runs with the same seed) sees the same samples; ``config.eval.max_examples``
  bounds its cost.

  Args:
    config: the run config.
    generator: the generator module.
    mesh: the device mesh.
    source: the split's checked source (``file_check.checked_source``).

  Returns:
    The function.
  """
  from p2p_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  dataset = input_pipeline.create_eval_dataset(config, config.data.eval_split, source)
  generate_fn = make_generate_fn(generator, config.eval.mode, config.seed, mesh)
  # eval.batch_size (checked positive by validate_eval_config) rounded up to a multiple of the
  # devices (run_batch pads a batch), so a default config validates on any mesh; the scores
  # do not depend on the batch size.
  batch_size = -(-config.eval.batch_size // mesh.devices.size) * mesh.devices.size
  feature_fn = None
  if config.eval.inception_path:  # FID / KID join val/ (a 2048-d sqrtm per validation).
    feature_fn = fid.load_feature_fn(config.eval.inception_path, mesh, batch_size)
  return lambda variables: score_split(dataset, generate_fn, variables, 1, batch_size, mesh,
                                       config.eval.max_examples, feature_fn=feature_fn)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Translates ``config.eval.split`` with the restored generator; writes images and metrics.

  Writes (process 0 only) ``workdir/eval/<step>/images/{name}_real_A.png``, the fakes (see
  ``fake_names``) and ``{name}_real_B.png``, ``index.html`` and ``metrics.json``, and the
  scalars ``eval/L1``, ``eval/PSNR``, ``eval/SSIM`` with a few image rows to TensorBoard in
  ``workdir/eval`` at the checkpoint step. Metrics are averaged over all examples and samples.
  With ``config.eval.inception_path`` set, also ``FID``, ``KID_mean`` and ``KID_std`` of all
  generated images against the split's real targets, on the uint8 images as written (see
  ``fid``). TensorBoard gets every score as ``eval/<name>``.

  Args:
    config: the run config (``config.eval.*``, ``config.data.*``, model fields).
    workdir: the run's workdir.

  Returns:
    The metrics dict written to ``metrics.json``.
  """
  from p2p_jax import input_pipeline  # Imports grain/tfds; only the eval mode needs it.
  input_pipeline.validate_eval_config(config)
  mode, num_samples = config.eval.mode, config.eval.num_samples
  models.check_eval_mode(mode)
  if num_samples < 1:
    raise ValueError(f'config.eval.num_samples={num_samples} must be at least 1.')
  if num_samples > 1 and mode != 'paper':
    raise ValueError(f'config.eval.num_samples={num_samples} needs config.eval.mode='
                     f"'paper': mode {mode!r} is deterministic, so its samples would be equal.")
  mesh = parallel.create_mesh()
  batch_size = config.eval.batch_size
  parallel.check_batch_size(batch_size, mesh, 'config.eval.batch_size')
  input_pipeline.validate_config(config)
  feature_fn = None
  if config.eval.inception_path:  # Read and checked before any generator work.
    feature_fn = fid.load_feature_fn(config.eval.inception_path, mesh, batch_size)
  from p2p_jax import file_check  # pylint: disable=g-import-not-at-top
  # Every file is decoded once before the generator is restored (cached in the workdir).
  source = file_check.checked_source(datasets.get_source(config, config.eval.split), config,
                                     config.eval.split, workdir,
                                     is_writer=jax.process_index() == 0)
  generator, variables, step = restore_generator(config, workdir, mesh)
  generate_fn = make_generate_fn(generator, mode, config.seed, mesh)
  dataset = input_pipeline.create_eval_dataset(config, config.eval.split, source)

  is_writer = jax.process_index() == 0
  out_dir = os.path.join(workdir, 'eval', str(step))
  image_dir = os.path.join(out_dir, 'images')
  if is_writer:
    epath.Path(image_dir).mkdir(parents=True, exist_ok=True)
  names, seen, tb_rows = [], set(), []

  def write(example, fakes):
    name = str(example['name'])
    _add_unique(seen, name, f'examples of split {config.eval.split!r}')
    names.append(name)
    if is_writer:
      row = _write_example(image_dir, name, example['A'], fakes, example['B'])
      if len(tb_rows) < config.num_image_examples:
        tb_rows.append(row)

  scores = score_split(dataset, generate_fn, variables, num_samples, batch_size, mesh,
                       config.eval.max_examples, on_example=write, feature_fn=feature_fn)
  num_images = len(names)
  if not num_images:
    raise ValueError(f'Split {config.eval.split!r} of the dataset is empty.')
  results = {'step': int(step), 'split': config.eval.split, 'mode': mode,
             'num_images': num_images, 'num_samples': num_samples, **scores}
  logging.info('Eval of step %d on %s (%s mode): %s', step, config.eval.split, mode, results)
  from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  writer = metric_writers.create_default_writer(os.path.join(workdir, 'eval'),
                                                just_logging=not is_writer)
  writer.write_scalars(step, {f'eval/{key}': value for key, value in scores.items()})
  if tb_rows:
    writer.write_images(step, {'eval/real_A-fake_B-real_B': np.stack(tb_rows)})
  writer.flush()
  writer.close()
  if is_writer:
    epath.Path(out_dir, 'metrics.json').write_text(json.dumps(results, indent=2))
    summary = ', '.join(f'{key} {value:.4f}' for key, value in scores.items())
    write_results_page(os.path.join(out_dir, 'index.html'),
                       f'Step {step}, split {config.eval.split}, mode {mode}',
                       f'{num_images} images. {summary}', names, num_samples)
  return results


def _read_image(data: bytes, path: str, channels: int, size: Optional[int]) -> np.ndarray:
  """An image file's bytes as ``(H, W, channels)`` float32 in [-1, 1], resized to ``size`` if
  given; ``path`` names the file in errors."""
  image = datasets.to_channels(datasets.to_8bit(datasets.open_image(data, path), path), channels)
  if size is not None:
    image = image.resize((size, size), Image.BICUBIC)
  array = np.asarray(image).reshape(image.height, image.width, channels)
  return images.to_float(array)


def _check_outputs_spare_inputs(input_dir: str, output_dir: str, outputs: list,
                                overwrite: bool) -> None:
  """Refuses an output folder that is the input folder, or that holds outputs already."""
  def resolved(path):
    return path if '://' in path else os.path.realpath(path)

  if resolved(input_dir) == resolved(output_dir):
    raise ValueError(f'config.translate.output_dir is the input folder {input_dir}: the '
                     'translations would overwrite PNG inputs. Use another output folder.')
  existing = [p for p in outputs if epath.Path(p).exists()]
  if existing and not overwrite:
    raise FileExistsError(
        f'config.translate.output_dir {output_dir} already holds {len(existing)} of the '
        f'outputs (e.g. {os.path.basename(existing[0])}); use an empty folder, or set '
        '--config.translate.overwrite=True to replace them.')


def translate(config: ml_collections.ConfigDict, workdir: str) -> list:
  """Translates every image in ``config.translate.input_dir`` to ``output_dir/<stem>.png``.

  With ``config.translate.resize`` inputs are resized (bicubic) to ``crop_size`` and outputs
  back to the input size; otherwise the generator runs fully convolutionally at the input size,
  which must be a multiple of ``models.required_multiple(config.model.netG)``. Same-size inputs are
  batched by the device count. ``config.eval.mode`` applies as in ``evaluate`` (sample 0, keys
  from the file's position in the sorted folder). Subdirectories and dot-files are skipped.

  Args:
    config: the run config (``config.translate.*``, ``config.eval.mode``, model fields).
    workdir: the run's workdir, holding the checkpoint.

  Returns:
    The output paths, in sorted input order.
  """
  input_dir, output_dir = config.translate.input_dir, config.translate.output_dir
  if not input_dir or not output_dir:
    raise ValueError('--mode=translate needs --config.translate.input_dir and '
                     '--config.translate.output_dir.')
  if not epath.Path(input_dir).is_dir():
    raise FileNotFoundError(f'config.translate.input_dir {input_dir} is not a directory.')
  paths = sorted(os.fspath(f) for f in epath.Path(input_dir).iterdir()
                 if not f.name.startswith('.') and not f.is_dir())
  if not paths:
    raise FileNotFoundError(f'config.translate.input_dir {input_dir} holds no files to '
                            'translate.')
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  outputs = [os.path.join(output_dir, f'{stem}.png') for stem in stems]
  _check_outputs_spare_inputs(input_dir, output_dir, outputs, config.translate.overwrite)
  seen = set()
  for stem in stems:
    _add_unique(seen, stem, f'files of {input_dir} (without extension)')
  models.check_eval_mode(config.eval.mode)
  if config.data.input_nc not in (1, 3):
    raise ValueError(f'config.data.input_nc must be 1 or 3 to read image files, got {config.data.input_nc}')
  # Decode every file before computing anything, so a bad file fails fast (BadImageError, a
  # ValueError naming the file). Each file is read once (from a bucket: one fetch) and its
  # bytes decoded again when its batch runs, so only encoded images are held in memory.
  encoded = [epath.Path(p).read_bytes() for p in paths]
  sizes = [datasets.open_image(data, p).size  # PIL sizes are (width, height).
           for data, p in zip(encoded, paths)]
  resize = config.translate.resize
  multiple = models.required_multiple(config.model.netG)
  if not resize:
    for path, (w, h) in zip(paths, sizes):
      if h % multiple or w % multiple:
        raise ValueError(
            f'{path} is {w}x{h}, but {config.model.netG} runs on heights and widths that are '
            f'multiples of {multiple}. Set --config.translate.resize=True to resize inputs '
            f'to crop_size ({config.data.crop_size}) and back.')

  mesh = parallel.create_mesh()
  generator, variables, _ = restore_generator(config, workdir, mesh)
  generate_fn = make_generate_fn(generator, config.eval.mode, config.seed, mesh)
  batch_size = mesh.devices.size
  groups = {}  # Model input size -> indices of the files, so a batch has one shape.
  for i, (w, h) in enumerate(sizes):
    groups.setdefault((config.data.crop_size,) * 2 if resize else (h, w), []).append(i)
  is_writer = jax.process_index() == 0
  if is_writer:
    epath.Path(output_dir).mkdir(parents=True, exist_ok=True)
  for indices in groups.values():
    for start in range(0, len(indices), batch_size):
      batch = indices[start:start + batch_size]
      inputs = np.stack([_read_image(encoded[i], paths[i], config.data.input_nc,
                                     config.data.crop_size if resize else None) for i in batch])
      fakes = run_batch(generate_fn, variables, inputs, 0, batch, batch_size, mesh)
      for i, fake in zip(batch, fakes):
        image = images.to_pil(images.to_uint8(fake))
        if resize and image.size != sizes[i]:
          image = image.resize(sizes[i], Image.BICUBIC)
        if is_writer:
          _save_png(image, outputs[i])
  logging.info('Translated %d images from %s to %s', len(paths), input_dir, output_dir)
  return outputs
