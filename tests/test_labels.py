"""Label maps: true labels at every level, aligned with and linked to their image.

On the shared TotalSegmentator CT (DICOM) and its label map (NIfTI, y-flipped
against the DICOM array), converted together by the command line.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import zarr

import mist_zarr
from mist_zarr.errors import ConversionError
from mist_zarr.labels import align_to, label_level, open_labels, write_labels

from .conftest import shared

MASK = ("nifti", "example_seg_dicom.nii.gz")
CT = ("ct", "TotalSegmentator-example-j2k")


def _source_tree(root):
    src = root / "src"
    shutil.copytree(shared(*CT), src / "ct")
    shutil.copy(shared(*MASK), src / "example_seg_dicom.nii.gz")
    for dirpath, _, files in os.walk(src):  # the shared files are read-only
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)
    return src


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("labels")
    src = _source_tree(root)
    dest = root / "ds"
    run = subprocess.run([sys.executable, "-m", "mist_zarr.cli", "convert", str(src), str(dest),
                          "--labels", "*seg*", "--quiet"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {r["path"]: r for r in mist_zarr.list_images(dest)}
    mask = next(p for p, r in rows.items() if r.get("kind") == "labels")
    image = rows[mask]["image"]
    return dest, image, mask, rows


def _source_mask() -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(shared(*MASK))
    return np.asarray(img.dataobj), img.affine


def test_mask_is_linked_with_its_image_both_ways(converted):
    dest, image, mask, rows = converted
    assert rows[image]["modality"] == "CT" and rows[image]["source_format"] == "dicom"
    assert rows[image]["label_maps"] == [mask]
    data, _ = _source_mask()
    assert rows[mask]["labels"] == [int(v) for v in np.unique(data) if v]


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_levels_hold_only_true_labels_on_the_image_grid(converted, k):
    dest, image, mask, _ = converted
    ct = mist_zarr.open(dest / image, scale=k)
    labels = mist_zarr.open(dest / mask, scale=k)
    assert labels.shape == ct.shape and labels.dims == ct.dims
    np.testing.assert_array_equal(labels.attrs["affine"], ct.attrs["affine"])
    for d in ct.dims:
        np.testing.assert_array_equal(labels[d].values, ct[d].values)
    data, affine = _source_mask()
    values = labels.values
    assert set(np.unique(values)) <= set(np.unique(data))
    # every level-k voxel holds the source label at its own world position
    z, y, x = np.meshgrid(*[np.arange(n) for n in values.shape], indexing="ij")
    ijk = np.stack([x.ravel(), y.ravel(), z.ravel(), np.ones(x.size)])
    src = np.linalg.inv(affine) @ (labels.attrs["affine"] @ ijk)
    i, j, kk = np.rint(src[:3]).astype(int)
    assert np.abs(src[:3] - np.rint(src[:3])).max() < 1e-3  # on the source's voxel grid
    np.testing.assert_array_equal(values.ravel(), data[i, j, kk])


def test_a_wavelet_pyramid_of_the_mask_would_invent_labels(converted):
    """Why labels have their own rule: the HTJ2K level of the same mask holds non-labels."""
    dest, image, mask, _ = converted
    data, _ = _source_mask()
    as_image = mist_zarr.write_image(dest.parent / "as_image.zarr",
                                     np.ascontiguousarray(data.T), dims=("z", "y", "x"))
    level1 = mist_zarr.open(dest.parent / "as_image.zarr", scale=1).values
    invented = set(np.unique(level1)) - set(np.unique(data))
    assert as_image.levels == 3 and len(invented) > 100
    assert not set(np.unique(mist_zarr.open(dest / mask, scale=1).values)) - set(np.unique(data))


def test_all_levels_are_smaller_than_the_nii_gz(converted):
    dest, _, mask, rows = converted
    assert rows[mask]["bytes"] < os.path.getsize(shared(*MASK)) / 2


def test_a_level_read_fetches_only_that_level(converted, tmp_path):
    dest, _, mask, _ = converted
    copy = tmp_path / "mask"
    shutil.copytree(dest / mask, copy)
    expected = mist_zarr.open(copy, scale=2).values
    for k in (0, 1, 3):  # the other levels' chunks are gone: level 2 still reads the same
        shutil.rmtree(copy / f"s{k}" / "labels" / "c")
    np.testing.assert_array_equal(mist_zarr.open(copy, scale=2).values, expected)
    assert expected.any() and not mist_zarr.open(copy, scale=0).values.any()  # level 0 is gone


def test_level_rule_is_the_even_sample_grid():
    a = np.arange(2 * 5 * 7, dtype=np.uint16).reshape(2, 5, 7)
    np.testing.assert_array_equal(label_level(a, ("z", "y", "x"), 1), a[:, ::2, ::2])
    np.testing.assert_array_equal(label_level(a, ("z", "y", "x"), 2), a[:, ::4, ::4])


def test_a_mask_on_another_grid_is_refused_with_the_reason(converted):
    dest, image, _, _ = converted
    _, info = mist_zarr.open_image(dest / image)
    data, affine = _source_mask()
    shifted = affine.copy()
    shifted[0, 3] += 0.5  # half a voxel off: would need resampling
    with pytest.raises(ConversionError, match="not on its image's grid"):
        align_to(np.ascontiguousarray(data.T), shifted, ("z", "y", "x"), info, where="m")


def test_a_float_mask_is_refused(tmp_path):
    with pytest.raises(ConversionError, match="integers"):
        write_labels(tmp_path / "m", np.full((2, 8, 8), 0.5), dims=("z", "y", "x"),
                     spacing=(1, 1, 1))


def test_a_label_group_is_plain_zarr_with_ngff_label_metadata(converted):
    dest, image, mask, _ = converted
    group = zarr.open_group(dest / mask, mode="r")
    ome = group.attrs["ome"]
    assert ome["image-label"]["source"]["image"] == image
    paths = [d["path"] for d in ome["multiscales"][0]["datasets"]]
    assert paths == [f"s{k}/labels" for k in range(4)]
    for k, path in enumerate(paths):
        assert group[path].shape == mist_zarr.open(dest / image, scale=k).shape
    _, info = open_labels(dest / mask)
    assert info.image == image and info.geometry.complete


def test_a_mask_named_like_one_gets_a_suggestion(tmp_path):
    data = np.asarray(nib.load(shared(*MASK)).dataobj)[:, :, :4]
    path = tmp_path / "liver_mask.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    report = mist_zarr.convert(path, tmp_path / "ds")
    assert report.ok
    [row] = report.converted
    assert any("looks like a label map" in w for w in row.warnings)
    assert mist_zarr.list_images(tmp_path / "ds")[0].get("kind") is None  # stored as an image


def test_nifti_intent_label_is_a_label_map_without_asking(tmp_path):
    data = np.zeros((16, 12, 3), np.uint8)
    data[2:9, 3:7, 1] = 4
    img = nib.Nifti1Image(data, np.diag([0.5, 0.5, 2, 1]))
    img.header.set_intent("label")
    nib.save(img, tmp_path / "m.nii.gz")
    report = mist_zarr.convert(tmp_path / "m.nii.gz", tmp_path / "ds")
    assert report.ok
    [row] = mist_zarr.list_images(tmp_path / "ds")
    assert row["kind"] == "labels" and row["image"] is None
    assert any("own geometry" in w for w in report.converted[0].warnings)
    np.testing.assert_array_equal(mist_zarr.open(tmp_path / "ds" / "m").values, data.T)
    assert gzip  # (the .nii.gz is written by nibabel)


# -- DICOM SEG (highdicom's test SEGs over pydicom's small CT series) -------------------
SEGS = ("seg_image_ct_binary.dcm", "seg_image_ct_binary_overlap.dcm")


@pytest.fixture(scope="module")
def seg_dataset(tmp_path_factory):
    from pydicom.data import get_testdata_files

    src = tmp_path_factory.mktemp("seg") / "src"
    src.mkdir()
    for f in get_testdata_files("dicomdirtests/77654033/CT2/*"):
        shutil.copy(f, src)
    for name in SEGS + ("seg_image_ct_true_fractional.dcm",):
        shutil.copy(shared("seg", name), src)
        os.chmod(src / name, 0o644)
    dest = src.parent / "ds"
    report = mist_zarr.convert(src, dest)
    return dest, report, {r["path"]: r for r in mist_zarr.list_images(dest)}


@pytest.mark.parametrize("name", SEGS)
def test_seg_is_laid_onto_its_referenced_series(seg_dataset, name):
    import highdicom as hd

    dest, _, rows = seg_dataset
    path = name.removesuffix(".dcm")
    image = rows[path]["image"]
    assert path in rows[image]["label_maps"]
    ct, labels = mist_zarr.open(dest / image), mist_zarr.open(dest / path)
    assert labels.shape[-3:] == ct.shape
    # pydicom's CT2 slices are not evenly spaced: no affine, the true positions as z, on both
    assert ct.attrs["affine"] is None and labels.attrs["affine"] is None
    np.testing.assert_array_equal(labels.attrs["nominal_affine"], ct.attrs["nominal_affine"])
    np.testing.assert_array_equal(labels.z.values, ct.z.values)
    seg = hd.seg.segread(shared("seg", name))
    uids = [u[0] for u in mist_zarr.read_metadata(dest / image)["dicom_per_slice"]["SOPInstanceUID"]]
    expected = seg.get_pixels_by_source_instance(uids, combine_segments=False)
    values = labels.values
    for i, n in enumerate(seg.segment_numbers):  # each segment where highdicom puts it
        got = values == n if values.ndim == 3 else values[i] == n
        np.testing.assert_array_equal(got, expected[..., i].astype(bool))
    assert [s["value"] for s in labels.attrs["labels"]["segments"]] == list(seg.segment_numbers)


def test_overlapping_segments_are_kept_one_channel_each(seg_dataset):
    dest, report, rows = seg_dataset
    row = rows["seg_image_ct_binary_overlap"]
    assert row["shape"][0] == 2
    [result] = [c for c in report.converted if c.path == "seg_image_ct_binary_overlap"]
    assert any("overlap" in w for w in result.warnings)


def test_fractional_seg_is_refused_with_the_reason(seg_dataset):
    _, report, rows = seg_dataset
    [problem] = [p for p in report.problems if "fractional" in p.source]
    assert "fractional SEG" in problem.reason and "refused" in problem.reason
    assert "seg_image_ct_true_fractional" not in rows


def test_seg_without_its_series_is_stored_in_its_own_geometry(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(shared("seg", "seg_image_ct_binary.dcm"), src)
    report = mist_zarr.convert(src, tmp_path / "ds")
    assert report.ok
    [result] = report.converted
    assert any("not in the dataset" in w for w in result.warnings)
    [row] = mist_zarr.list_images(tmp_path / "ds")
    assert row["kind"] == "labels" and row["image"] is None
    assert mist_zarr.open(tmp_path / "ds" / row["path"]).values.any()


# -- export -----------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 2])
def test_mask_exports_to_nifti_with_exact_labels_and_the_image_affine(converted, tmp_path, k):
    dest, image, mask, _ = converted
    result = mist_zarr.export(dest / mask, tmp_path / "m.nii.gz", format="nifti", scale=k)
    img = nib.load(result.files[0])
    assert img.header.get_intent()[0] == "label"
    np.testing.assert_allclose(img.affine, mist_zarr.open(dest / image, scale=k).attrs["affine"])
    stored = mist_zarr.open(dest / mask, scale=k).values
    np.testing.assert_array_equal(np.asarray(img.dataobj).T, stored)
    assert np.asarray(img.dataobj).dtype == stored.dtype


def test_mask_exports_to_png_index_and_false_colour(converted, tmp_path):
    from PIL import Image

    dest, _, mask, _ = converted
    stored = mist_zarr.open(dest / mask, scale=1).values
    index = mist_zarr.export(dest / mask, tmp_path / "i", format="png", scale=1)
    colour = mist_zarr.export(dest / mask, tmp_path / "c", format="png", scale=1, colour=True)
    assert len(index.files) == len(colour.files) == stored.shape[0]
    seen: dict[int, tuple[int, ...]] = {}
    for z, (fi, fc) in enumerate(zip(index.files, colour.files)):
        np.testing.assert_array_equal(np.asarray(Image.open(fi)), stored[z])
        rgb = np.asarray(Image.open(fc))
        for v in np.unique(stored[z]):  # one colour per label, the same in every slice
            colours = {tuple(c) for c in rgb[stored[z] == v]}
            assert len(colours) == 1
            assert seen.setdefault(int(v), colours.pop()) == seen[int(v)]
    assert seen[0] == (0, 0, 0) and len(set(seen.values())) == len(seen)


@pytest.mark.parametrize("k", [0, 1])
def test_mask_exports_to_a_dicom_seg_over_its_image_series(converted, tmp_path, k):
    import highdicom as hd
    import pydicom

    dest, image, mask, _ = converted
    result = mist_zarr.export(dest / mask, tmp_path / "seg", format="dicom", scale=k)
    seg = hd.seg.segread(tmp_path / "seg" / "seg.dcm")
    series = sorted((tmp_path / "seg" / "image").glob("*.dcm"))
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in series]
    # the instances referenced are those any DICOM export of the image at level k gives
    again = mist_zarr.export(dest / image, tmp_path / "again", format="dicom", scale=k)
    assert uids == [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                    for f in sorted(again.files)]
    stored = mist_zarr.open(dest / mask, scale=k).values
    values = [int(v) for v in np.unique(stored) if v]
    assert [int(n) for n in seg.segment_numbers] == list(range(1, len(values) + 1))
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids,
                                               combine_segments=False)
    assert pixels.shape[:3] == stored.shape
    for n, value in enumerate(values, start=1):
        item = seg.get_segment_description(n)
        assert item.tracking_id == f"mist-zarr label value {value}"
        np.testing.assert_array_equal(pixels[..., n - 1].astype(bool), stored == value)
    assert any("renumbered" in note for note in result.notes) == (values != list(
        range(1, len(values) + 1)))


def test_cli_exports_a_mask_as_seg_and_in_false_colour(converted, tmp_path):
    from PIL import Image

    dest, _, mask, _ = converted
    for fmt, extra, out in (("dicom", [], "seg"), ("png", ["--colour"], "png")):
        run = subprocess.run([sys.executable, "-m", "mist_zarr.cli", "export", str(dest / mask),
                              str(tmp_path / out), "--format", fmt, "--scale", "2", *extra],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert "at level 2" in run.stdout
    assert (tmp_path / "seg" / "seg.dcm").is_file()
    assert np.asarray(Image.open(sorted((tmp_path / "png").glob("*.png"))[0])).shape[-1] == 3


def test_a_mask_of_a_nifti_image_is_refused_as_dicom_seg(tmp_path):
    volume = np.zeros((4, 64, 64), np.int16)
    mist_zarr.write_image(tmp_path / "img", volume, source_format="nifti")
    _, info = mist_zarr.open_image(tmp_path / "img")
    write_labels(tmp_path / "m", np.ones((4, 64, 64), np.uint8), dims=("z", "y", "x"),
                 spacing=info.spacing, affine=info.affine, image="img", levels=info.levels)
    with pytest.raises(mist_zarr.errors.ExportError, match="came from nifti"):
        mist_zarr.export(tmp_path / "m", tmp_path / "out", format="dicom")


# -- loader ------------------------------------------------------------------------------
@pytest.mark.parametrize("how", [{"scale": 2}, {"size": 200}, {}])
def test_dataset_yields_image_mask_pairs_at_the_chosen_level(converted, how):
    import pickle

    dest, image, mask, _ = converted
    ds = pickle.loads(pickle.dumps(mist_zarr.MistDataset(dest, labels=True, **how)))
    assert len(ds) == 1
    item = ds[0]
    k = {"scale": 2, "size": 1}.get(next(iter(how), None), 0)
    assert item["level"] == k and item["path"] == image and item["mask_path"] == mask
    assert item["mask"].shape == item["image"].shape
    np.testing.assert_array_equal(item["mask"], mist_zarr.open(dest / mask, scale=k).values)
    assert len(mist_zarr.MistDataset(dest)) == 1  # without labels: the image alone


def test_seg_built_from_the_real_ct_and_mask_matches_the_mask_at_every_level(converted,
                                                                             tmp_path):
    """A highdicom SEG of the TotalSegmentator mask over its real CT, converted beside it."""
    import highdicom as hd
    import pydicom
    from pydicom.uid import generate_uid

    dest, _, mask, _ = converted
    src = tmp_path / "src"
    shutil.copytree(shared(*CT), src / "ct")
    # the example CT is anonymised down to empty Series/SOPInstanceUIDs: give the copies some
    series = generate_uid()
    for f in (src / "ct").iterdir():
        os.chmod(f, 0o644)
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, generate_uid()
        ds.SOPClassUID = ds.SOPClassUID or "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
        ds.StudyInstanceUID = ds.StudyInstanceUID or "1.2.826.0.1.3680043.8.498.1"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(f)
    out = tmp_path / "ds"
    assert mist_zarr.convert(src, out).ok
    [ct_row] = mist_zarr.list_images(out)
    uids = [u[0] for u in mist_zarr.read_metadata(out / ct_row["path"])["dicom_per_slice"]
            ["SOPInstanceUID"]]
    by_uid = {str(d.SOPInstanceUID): d for d in
              (pydicom.dcmread(f, stop_before_pixels=True) for f in (src / "ct").iterdir())}
    labels = mist_zarr.open(dest / mask).values  # level 0, in the CT's slice order
    values = [int(v) for v in np.unique(labels) if v]
    relabelled = np.searchsorted([0] + values, labels).astype(np.uint8)  # segments 1..n
    algorithm = hd.AlgorithmIdentificationSequence(
        name="TotalSegmentator", version="example", family=hd.sr.CodedConcept(
            "123109", "DCM", "Manual Processing"))
    descriptions = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=f"label {v}",
        segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
        segmented_property_type=hd.sr.CodedConcept("85756007", "SCT", "Tissue"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm) for i, v in enumerate(values)]
    seg = hd.seg.Segmentation(
        source_images=[by_uid[u] for u in uids], pixel_array=relabelled,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=9,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="mist-zarr tests",
        manufacturer_model_name="test", software_versions="1", device_serial_number="1")
    seg.save_as(src / "totalseg_seg.dcm")
    report = mist_zarr.convert(src, out, skip_existing=True)
    assert report.ok, report.problems
    rows = {r["path"]: r for r in mist_zarr.list_images(out)}
    assert rows["totalseg_seg"]["image"] == ct_row["path"]
    for k in range(4):
        got = mist_zarr.open(out / "totalseg_seg", scale=k)
        image = mist_zarr.open(out / ct_row["path"], scale=k)
        assert got.shape == image.shape
        np.testing.assert_array_equal(got.attrs["affine"], image.attrs["affine"])
        np.testing.assert_array_equal(got.values, label_level(relabelled, "zyx", k))


# -- RTSTRUCT (rt-utils builds one from the real CT and mask) -----------------------------
def _uid_ct(root):
    """A copy of the example CT with the UIDs its anonymisation removed."""
    import pydicom
    from pydicom.uid import generate_uid

    src = root / "ct"
    shutil.copytree(shared(*CT), src)
    series, frame = generate_uid(), generate_uid()
    for f in src.iterdir():
        os.chmod(f, 0o644)
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, generate_uid()
        ds.SOPClassUID = ds.SOPClassUID or "1.2.840.10008.5.1.4.1.1.2"
        ds.StudyInstanceUID = ds.StudyInstanceUID or generate_uid()
        ds.FrameOfReferenceUID = frame
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(f)
    return src


@pytest.fixture(scope="module")
def rtstruct_case(converted, tmp_path_factory):
    from rt_utils import RTStructBuilder

    dest, _, mask, _ = converted
    root = tmp_path_factory.mktemp("rt")
    src = root / "src"
    ct = _uid_ct(src)
    out = root / "ds"
    assert mist_zarr.convert(src, out).ok
    [ct_row] = mist_zarr.list_images(out)
    labels = mist_zarr.open(dest / mask).values  # (z, y, x) in the stored CT's slice order
    rt = RTStructBuilder.create_new(dicom_series_path=str(ct))
    stored = [u[0] for u in mist_zarr.read_metadata(out / ct_row["path"])["dicom_per_slice"]
              ["SOPInstanceUID"]]
    order = [stored.index(str(d.SOPInstanceUID)) for d in rt.series_data]  # rt-utils' order
    rois = {"liver": 5, "spleen": 1}
    for name, value in rois.items():
        rt.add_roi(mask=np.moveaxis(labels[order] == value, 0, -1), name=name)
    rt.save(str(src / "structures.dcm"))
    report = mist_zarr.convert(src, out, skip_existing=True)
    return out, ct_row["path"], report, labels, rois, src


def test_rtstruct_is_rasterised_onto_its_image(rtstruct_case):
    out, image, report, labels, rois, _ = rtstruct_case
    assert report.ok, report.problems
    rows = {r["path"]: r for r in mist_zarr.list_images(out)}
    assert rows["structures"]["image"] == image and rows[image]["label_maps"] == ["structures"]
    got = mist_zarr.open(out / "structures")
    ct = mist_zarr.open(out / image)
    np.testing.assert_array_equal(got.attrs["affine"], ct.attrs["affine"])
    names = {s["name"]: s["value"] for s in got.attrs["labels"]["segments"]}
    values = got.values
    for name, label in rois.items():
        ours, truth = values == names[name], labels == label
        dice = 2 * (ours & truth).sum() / (ours.sum() + truth.sum())
        # pixel centres strictly inside rt-utils' boundary-pixel polygons: the contour
        # pixels themselves may go either way, nothing outside the mask comes in
        assert dice > 0.95, (name, dice)
        assert (ours & ~truth).sum() <= 0.01 * truth.sum()
    assert mist_zarr.open(out / "structures", scale=2).shape == ct.sel().shape[:1] + (128, 128)


def test_rtstruct_contours_outside_the_image_are_refused(rtstruct_case, tmp_path):
    import pydicom

    out, _, _, _, _, src = rtstruct_case
    ds = pydicom.dcmread(src / "structures.dcm")
    contour = ds.ROIContourSequence[0].ContourSequence[0]
    points = np.asarray(contour.ContourData, float).reshape(-1, 3)
    points[:, 0] += 1000.0  # a metre to the side
    contour.ContourData = [float(v) for v in points.ravel()]
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    bad = tmp_path / "bad"
    shutil.copytree(src / "ct", bad / "ct")
    ds.save_as(bad / "outside.dcm")
    report = mist_zarr.convert(bad, tmp_path / "ds")
    [problem] = report.problems
    assert "outside the image" in problem.reason and "refused" in problem.reason
