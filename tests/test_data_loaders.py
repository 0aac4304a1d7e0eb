"""Image folders, archives, Tiny-ImageNet, downloads and TFDS (mocked)."""

import hashlib
import pathlib
import shutil
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from cll_jax import data

CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog',
                   'frog', 'horse', 'ship', 'truck')
SHARED_CIFAR = pathlib.Path(__file__).resolve().parents[2] / (
    'shared/datasets/cifar10_jpeg.tar.gz')


def _write_png(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def _make_folder(root, seed=0, h=4, w=5):
  """root/{train,test}/{b_cls,a_cls}/*.png; returns expected arrays."""
  rng = np.random.default_rng(seed)
  expect = {}
  for split, n in (('train', 3), ('test', 2)):
    images, labels = [], []
    for label, cls in enumerate(['a_cls', 'b_cls']):  # Sorted: a=0, b=1.
      for i in range(n):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ext = '.PNG' if i == 0 else '.png'
        _write_png(root / split / cls / f'{i:03d}{ext}', img)
        images.append(img)
        labels.append(label)
    (root / split / 'b_cls' / 'notes.txt').write_text('not an image')
    expect[split] = (np.stack(images), np.array(labels, np.int32))
  return expect


def _check(ds, expect):
  assert ds.class_names == ('a_cls', 'b_cls') and ds.num_classes == 2
  for split in ('train', 'test'):
    images = getattr(ds, f'{split}_images')
    labels = getattr(ds, f'{split}_labels')
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    np.testing.assert_array_equal(images, expect[split][0])  # PNG: lossless.
    np.testing.assert_array_equal(labels, expect[split][1])


def test_image_folder_and_cache(tmp_path):
  root = tmp_path / 'data'
  expect = _make_folder(root)
  cache = tmp_path / 'cache'
  ds = data.load_dataset('image_folder', root=str(root), cache_dir=cache)
  _check(ds, expect)
  assert ds.image_shape == (4, 5, 3)
  assert len(list(cache.glob('*.npz'))) == 1
  _check(data.load_image_folder(root, cache_dir=cache), expect)
  assert len(list(cache.glob('*.npz'))) == 1  # Reused, not rewritten.
  # Changing an image invalidates the cache.
  new = np.full((4, 5, 3), 7, np.uint8)
  _write_png(root / 'train' / 'a_cls' / '000.PNG', new)
  ds = data.load_image_folder(root, cache_dir=cache)
  np.testing.assert_array_equal(ds.train_images[0], new)
  assert not list(cache.glob('.*tmp'))  # No temporary files left behind.


def test_grayscale_becomes_rgb_and_mixed_sizes_fail(tmp_path):
  root = tmp_path / 'data'
  _make_folder(root)
  gray = np.arange(20, dtype=np.uint8).reshape(4, 5)
  _write_png(root / 'train' / 'a_cls' / 'zz_gray.png', gray)
  ds = data.load_image_folder(root, cache_dir=tmp_path / 'c1')
  np.testing.assert_array_equal(ds.train_images[3],
                                np.repeat(gray[..., None], 3, -1))
  _write_png(root / 'test' / 'a_cls' / 'big.png',
             np.zeros((6, 6, 3), np.uint8))
  with pytest.raises(ValueError, match='big.png'):
    data.load_image_folder(root, cache_dir=tmp_path / 'c2')


@pytest.mark.parametrize('kind', ['tar.gz', 'tgz', 'zip'])
def test_image_folder_archives(tmp_path, kind):
  src = tmp_path / 'src'
  expect = _make_folder(src / 'mydata')  # Splits inside one top folder.
  archive = tmp_path / f'mydata.{kind}'
  if kind == 'zip':
    with zipfile.ZipFile(archive, 'w') as zf:
      for p in sorted((src).rglob('*')):
        zf.write(p, p.relative_to(src))
  else:
    with tarfile.open(archive, 'w:gz') as tf:
      tf.add(src / 'mydata', arcname='mydata')
  cache = tmp_path / 'cache'
  _check(data.load_image_folder(str(archive), cache_dir=cache), expect)
  extracted = list((cache / 'extracted').iterdir())
  assert len(extracted) == 1 and not extracted[0].name.startswith('.')
  # The second load reads the npz only: it works without the extraction.
  shutil.rmtree(cache / 'extracted')
  _check(data.load_image_folder(archive, cache_dir=cache), expect)


def test_image_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere'):
    data.load_image_folder(tmp_path / 'nowhere', cache_dir=tmp_path / 'c')
  root = tmp_path / 'data'
  _make_folder(root)
  with pytest.raises(FileNotFoundError, match='val'):
    data.load_image_folder(root, test_split='val', cache_dir=tmp_path / 'c')
  _write_png(root / 'test' / 'c_cls' / 'x.png', np.zeros((4, 5, 3), np.uint8))
  with pytest.raises(ValueError, match='c_cls'):
    data.load_image_folder(root, cache_dir=tmp_path / 'c')


def test_cifar10_class_folders_sort_into_label_order():
  assert tuple(sorted(CIFAR10_CLASSES)) == CIFAR10_CLASSES
  if not SHARED_CIFAR.exists():
    pytest.skip(f'{SHARED_CIFAR} not available')
  classes = set()
  with tarfile.open(SHARED_CIFAR) as tf:
    for member in tf:
      parts = member.name.strip('./').split('/')
      if len(parts) >= 3 and parts[-3] == 'train':
        classes.add(parts[-2])
  assert tuple(sorted(classes)) == CIFAR10_CLASSES


# --- Tiny-ImageNet ----------------------------------------------------------

WNIDS = ['n02', 'n01', 'n03']  # Not sorted in wnids.txt, as in the release.


def _make_tiny(top):
  """A 3-class, 8x8 Tiny-ImageNet release under `top`."""
  rng = np.random.default_rng(1)
  (top / 'wnids.txt').parent.mkdir(parents=True)
  (top / 'wnids.txt').write_text('\n'.join(WNIDS) + '\n')
  (top / 'words.txt').write_text(
      'n00\tunused\nn01\tgoldfish, Carassius auratus\nn02\tcat\nn03\tdog\n')
  for wnid in WNIDS:
    for i in range(2):
      img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
      path = top / 'train' / wnid / 'images' / f'{wnid}_{i}.JPEG'
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(img).save(path, format='JPEG')
    (top / 'train' / wnid / f'{wnid}_boxes.txt').write_text('')
  # One grayscale training image, as in the real release.
  Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(
      top / 'train' / 'n03' / 'images' / 'n03_2.JPEG', format='JPEG')
  val_labels = ['n03', 'n01', 'n02', 'n03']
  lines = []
  for i, wnid in enumerate(val_labels):
    path = top / 'val' / 'images' / f'val_{i}.JPEG'
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
        path, format='JPEG')
    lines.append(f'val_{i}.JPEG\t{wnid}\t0\t0\t7\t7')
  (top / 'val' / 'val_annotations.txt').write_text('\n'.join(lines) + '\n')


def _pil(path):
  return np.asarray(Image.open(path).convert('RGB'))


def _zip_tiny(tmp_path):
  src = tmp_path / 'src'
  _make_tiny(src / 'tiny-imagenet-200')
  archive = tmp_path / 'zips' / 'tiny-imagenet-200.zip'
  archive.parent.mkdir()
  with zipfile.ZipFile(archive, 'w') as zf:
    for p in sorted(src.rglob('*')):
      zf.write(p, p.relative_to(src))
  return src / 'tiny-imagenet-200', archive


def _check_tiny(ds, top):
  assert ds.num_classes == 3
  assert ds.class_names == ('goldfish, Carassius auratus', 'cat', 'dog')
  # Labels follow the sorted wnids n01, n02, n03.
  np.testing.assert_array_equal(ds.train_labels, [0, 0, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(ds.test_labels, [2, 0, 1, 2])
  assert ds.train_images.shape == (7, 8, 8, 3)
  assert ds.test_images.shape == (4, 8, 8, 3)
  np.testing.assert_array_equal(
      ds.train_images[0], _pil(top / 'train/n01/images/n01_0.JPEG'))
  np.testing.assert_array_equal(
      ds.train_images[6], _pil(top / 'train/n03/images/n03_2.JPEG'))
  np.testing.assert_array_equal(
      ds.test_images[2], _pil(top / 'val/images/val_2.JPEG'))


def test_tiny_imagenet_folder_and_zip(tmp_path):
  top, archive = _zip_tiny(tmp_path)
  _check_tiny(data.load_tiny_imagenet(top, cache_dir=tmp_path / 'c1'), top)
  # The parent of the release folder works too.
  _check_tiny(data.load_tiny_imagenet(top.parent, cache_dir=tmp_path / 'c2'),
              top)
  _check_tiny(data.load_dataset('tiny_imagenet', root=str(archive),
                                cache_dir=tmp_path / 'c3'), top)
  with pytest.raises(FileNotFoundError, match='download=True'):
    data.load_tiny_imagenet(tmp_path / 'missing.zip', cache_dir=tmp_path)


def test_download_file_url(tmp_path):
  top, archive = _zip_tiny(tmp_path)
  url = archive.as_uri()
  payload = archive.read_bytes()
  sha = hashlib.sha256(payload).hexdigest()
  dest = tmp_path / 'dl'
  with pytest.raises(ValueError, match='sha256'):
    data.download_tiny_imagenet(dest, url, sha256='0' * 64, progress=False)
  with pytest.raises(ValueError, match='bytes'):
    data.download_tiny_imagenet(dest, url, size=len(payload) + 1,
                                progress=False)
  assert not dest.exists() or not list(dest.iterdir())  # Nothing kept.
  path = data.download_tiny_imagenet(dest, url, sha256=sha,
                                     size=len(payload))
  assert path == dest / 'tiny-imagenet-200.zip'
  assert path.read_bytes() == payload
  # Already there: verified, not fetched again.
  assert data.download_tiny_imagenet(dest, 'file:///nonexistent/'
                                     'tiny-imagenet-200.zip') == path
  # load_tiny_imagenet(download=True) fetches into the folder of `root`.
  root = tmp_path / 'dl2' / 'tiny-imagenet-200.zip'
  ds = data.load_tiny_imagenet(root, download=True, url=url,
                               cache_dir=tmp_path / 'c')
  assert root.exists()
  _check_tiny(ds, top)


# --- TFDS -------------------------------------------------------------------

@pytest.mark.parametrize('name,shape,num_classes',
                         [('cifar10', (32, 32, 3), 10),
                          ('cifar100', (32, 32, 3), 100),
                          ('mnist', (28, 28, 1), 10)])
def test_tfds_loader_with_mock_data(tmp_path, name, shape, num_classes):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=6):
    ds = data.load_dataset(name, cache_dir=tmp_path)
    direct = tfds.data_source(name, split='test')
    expect = np.stack([direct[i]['image'] for i in range(len(direct))])
    expect_labels = [int(direct[i]['label']) for i in range(len(direct))]
  assert ds.train_images.shape == (6,) + shape
  assert ds.test_images.shape == (6,) + shape
  assert ds.train_images.dtype == np.uint8
  assert ds.train_labels.dtype == np.int32
  assert ds.num_classes == num_classes and len(ds.class_names) == num_classes
  for labels in (ds.train_labels, ds.test_labels):
    assert labels.min() >= 0 and labels.max() < num_classes
  np.testing.assert_array_equal(ds.test_images, expect)
  np.testing.assert_array_equal(ds.test_labels, expect_labels)
  assert ds.train_images.max() > 0  # Random mock images, not zeros.
  assert len(list(tmp_path.glob('tfds-*.npz'))) == 1


# --- errors and the cache -----------------------------------------------------

def test_truncated_image_names_the_file(tmp_path):
  expect = _make_folder(tmp_path / 'root')
  del expect
  bad = tmp_path / 'root' / 'train' / 'a_cls' / 'bad.jpg'
  Image.fromarray(np.full((4, 5, 3), 90, np.uint8)).save(bad, quality=90)
  bad.write_bytes(bad.read_bytes()[:60])  # cut inside the JPEG data
  with pytest.raises(ValueError, match=r'cannot decode image file .*bad\.jpg'):
    data.load_image_folder(tmp_path / 'root', cache_dir=tmp_path / 'c')


def test_unprepared_tfds_set_says_how_to_get_it(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(FileNotFoundError,
                     match=r"not prepared.*download=True.*data=offline"):
    data.load_dataset('cifar10', data_dir=str(tmp_path), cache_dir=tmp_path)


def test_unreachable_download_says_what_to_do(tmp_path):
  with pytest.raises(ConnectionError, match='kwargs.root'):
    data.download_tiny_imagenet(tmp_path, 'file:///nonexistent/tin.zip',
                                progress=False)
  assert not list(tmp_path.iterdir())  # no partial file left


def test_cache_keeps_to_its_size_limit_least_recently_used_first(
    tmp_path, monkeypatch):
  import os  # pylint: disable=g-import-not-at-top
  from cll_jax.data import cache  # pylint: disable=g-import-not-at-top
  blob = np.zeros(250_000, np.uint8)  # ~0.25 MB per entry
  monkeypatch.setenv('CLL_JAX_CACHE_MAX_GB', str(0.8 / 1024))  # 0.8 MB
  for i, name in enumerate(('a', 'b', 'c')):
    cache.save_npz(tmp_path / f'{name}.npz', {'x': blob})
    os.utime(tmp_path / f'{name}.npz', (1000 + i, 1000 + i))
  assert cache.load_npz(tmp_path / 'a.npz') is not None  # a: used last
  cache.save_npz(tmp_path / 'd.npz', {'x': blob})  # over the limit now
  assert sorted(p.name for p in tmp_path.glob('*.npz')) == [
      'a.npz', 'c.npz', 'd.npz']
  # The entry just written is never the one removed.
  monkeypatch.setenv('CLL_JAX_CACHE_MAX_GB', '0')
  cache.save_npz(tmp_path / 'e.npz', {'x': blob})
  assert [p.name for p in tmp_path.glob('*.npz')] == ['e.npz']
