// Builds the viewer into dist/: the bundle (esbuild), its CSS and OpenJPH's
// WebAssembly, copied from node_modules. Run by `npm run build`, which the
// Python package build runs (setup.py) after `npm ci`.
import { build } from "esbuild";
import { copyFileSync, mkdirSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const here = new URL(".", import.meta.url).pathname;
mkdirSync(here + "dist", { recursive: true });
await build({
  entryPoints: [here + "src/main.js"],
  bundle: true,
  // iife, not esm: OpenJPH's Emscripten glue has require("fs") on its
  // Node-only path, which a classic-script bundle leaves as a call that
  // browsers never reach.
  format: "iife",
  platform: "browser",
  external: ["fs", "path"],
  target: ["es2022"],
  minify: true,
  sourcemap: false,
  legalComments: "eof",
  outfile: here + "dist/viewer.js",
  logLevel: "warning",
});
copyFileSync(here + "src/viewer.css", here + "dist/viewer.css");
copyFileSync(require.resolve("@cornerstonejs/codec-openjph/wasm"), here + "dist/openjphjs.wasm");
console.log("built", here + "dist/");
