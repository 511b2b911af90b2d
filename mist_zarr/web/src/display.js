// Sample values, window/level and the grey image drawn on the canvas.
//
// The rule (mist_zarr.viewer.window_grey is the same rule in Python, used by
// the tests as the server-side rendering):
//   value = the caller's value (values mapping, as mist_zarr.open returns it)
//   x     = value * slope + intercept   (DICOM rescale, CT only; else x = value)
//   grey  = round(255 * clip((x - (center - width / 2)) / width, 0, 1))
//   MONOCHROME1 images are shown inverted (255 - grey).

const DICOM = {
  windowCenter: "00281050",
  windowWidth: "00281051",
  intercept: "00281052",
  slope: "00281053",
};

// CT presets in Hounsfield units: [label, center, width].
export const CT_PRESETS = [
  ["Soft tissue", 40, 400],
  ["Lung", -600, 1500],
  ["Bone", 300, 1500],
  ["Brain", 40, 80],
  ["Liver", 60, 160],
];

function dicomNumber(dicom, tag) {
  const v = dicom?.[tag]?.Value?.[0];
  return typeof v === "number" && Number.isFinite(v) ? v : null;
}

/** How to turn decoded stored samples into displayed units, from the image document. */
export function valueModel(mist) {
  const values = mist.values || { kind: "identity", dtype: mist.values?.dtype };
  const meta = mist.metadata || {};
  const dicom = meta.dicom || {};
  const modality = meta.modality || dicom["00080060"]?.Value?.[0] || "";
  const slope = dicomNumber(dicom, DICOM.slope);
  const intercept = dicomNumber(dicom, DICOM.intercept);
  const rescaled = modality === "CT" && slope !== null && intercept !== null;
  let lo = -Infinity;
  let hi = Infinity;
  if (values.kind === "cast") {
    const m = /^(u?)int(\d+)$/.exec(values.dtype);
    if (m) {
      const bits = +m[2];
      lo = m[1] ? 0 : -(2 ** (bits - 1));
      hi = m[1] ? 2 ** bits - 1 : 2 ** (bits - 1) - 1;
    } else if (values.dtype === "bool") {
      lo = 0;
      hi = 1;
    }
  }
  return {
    modality,
    kind: values.kind,
    scale: values.scale ?? 1,
    offset: values.offset ?? 0,
    lo,
    hi,
    bool: values.dtype === "bool",
    slope: rescaled ? slope : 1,
    intercept: rescaled ? intercept : 0,
    rescaled,
    unit: rescaled ? "HU" : "",
    inverted: (meta.photometric || dicom["00280004"]?.Value?.[0]) === "MONOCHROME1",
    storedWindow: [dicomNumber(dicom, DICOM.windowCenter), dicomNumber(dicom, DICOM.windowWidth)],
  };
}

/** Displayed units (HU for CT) of one stored sample. */
export function displayValue(model, stored) {
  let v = stored;
  if (model.kind === "quantized") v = v * model.scale + model.offset;
  else if (model.bool) v = v > 0 ? 1 : 0;
  else v = Math.min(Math.max(v, model.lo), model.hi);
  return v * model.slope + model.intercept;
}

/** Window presets for this image: [label, center, width] in displayed units. */
export function presets(model, samples) {
  const out = [];
  const [c, w] = model.storedWindow;
  if (c !== null && w !== null && w > 0) out.push(["Stored (DICOM)", c, w]);
  if (model.rescaled) out.push(...CT_PRESETS);
  if (samples) out.push(["Percentiles 1-99", ...percentileWindow(model, samples)]);
  return out;
}

/** Center and width spanning the 1st to 99th percentile of the samples' displayed values. */
export function percentileWindow(model, samples) {
  const values = Float64Array.from(samples, (s) => displayValue(model, s)).sort();
  const at = (q) => values[Math.min(values.length - 1, Math.max(0, Math.round(q * (values.length - 1))))];
  const lo = at(0.01);
  const hi = at(0.99);
  const width = Math.max(hi - lo, 1);
  return [lo + width / 2, width];
}

/** RGBA pixels for a decoded plane (components 1, 3 or 4, interleaved) under a window. */
export function render(model, plane, center, width) {
  const { width: w, height: h, components, samples } = plane;
  const rgba = new Uint8ClampedArray(w * h * 4);
  const lo = center - width / 2;
  const grey = (s) => {
    const g = Math.round((255 * Math.min(Math.max((displayValue(model, s) - lo) / width, 0), 1)));
    return model.inverted ? 255 - g : g;
  };
  for (let i = 0; i < w * h; i++) {
    const base = i * components;
    const r = grey(samples[base]);
    rgba[4 * i] = r;
    rgba[4 * i + 1] = components >= 3 ? grey(samples[base + 1]) : r;
    rgba[4 * i + 2] = components >= 3 ? grey(samples[base + 2]) : r;
    rgba[4 * i + 3] = 255;
  }
  return new ImageData(rgba, w, h);
}
