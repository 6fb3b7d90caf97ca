// Calling the service from TypeScript with types generated from its OpenAPI document
// (openapi-typescript, binary parts typed as Blob) and openapi-fetch:
//
//   npx openapi-typescript http://localhost:8000/openapi.json -o schema.d.ts   (see docs/clients.md for Blob)
//
// Uploads are sent as the whole body (Content-Type image/png, audio/wav...), which every prediction
// endpoint takes: no multipart form to build.
import createClient from "openapi-fetch";
import type { components, paths } from "./schema";

type Digit = components["schemas"]["DigitPrediction"];

export async function run(baseUrl: string, drawing: Blob, clip: Blob) {
  const client = createClient<paths>({ baseUrl });
  // openapi-fetch writes a body as JSON unless told otherwise: a file goes as it is.
  const raw = { bodySerializer: (body: unknown) => body as Blob };

  const digits = await client.POST("/v1/digits/predict", { body: drawing, headers: { "Content-Type": "image/png" }, ...raw });
  if (!digits.data) throw new Error(`digits: ${JSON.stringify(digits.error)}`);
  const digit: Digit = digits.data.predictions[0];
  const best = digit.classes.reduce((a, b) => (b.probability > a.probability ? b : a));

  const emotion = await client.POST("/v1/emotion/predict", { body: clip, headers: { "Content-Type": "audio/wav" }, ...raw });
  if (!emotion.data) throw new Error(`emotion: ${JSON.stringify(emotion.error)}`);

  const segments = await client.POST("/v1/clustering/predict", {
    body: { instances: [{ annual_income: 15, spending_score: 39 }, { annual_income: 120, spending_score: 85 }] },
  });
  if (!segments.data) throw new Error(`segments: ${JSON.stringify(segments.error)}`);

  return {
    digit: digit.label, digit_best_class: best.label,
    emotion: emotion.data.predictions[0].label, emotion_version: emotion.response.headers.get("X-Model-Version"),
    segments: segments.data.predictions.map((p) => p.segment),
  };
}
