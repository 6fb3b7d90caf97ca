// schema.d.ts from an OpenAPI document, with binary strings typed as Blob (openapi-typescript's
// documented transform), so an upload's type is what a browser or Node has in hand.
//   node generate.mjs spec.json schema.d.ts
import fs from "node:fs";
import openapiTS, { astToString } from "openapi-typescript";
import ts from "typescript";

const BLOB = ts.factory.createTypeReferenceNode(ts.factory.createIdentifier("Blob"));
const spec = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const ast = await openapiTS(spec, {
  defaultNonNullable: false,
  transform(schemaObject) {
    if (schemaObject.format === "binary") return BLOB;
    return undefined;
  },
});
fs.writeFileSync(process.argv[3], astToString(ast));
