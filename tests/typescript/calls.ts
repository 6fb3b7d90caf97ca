// A typed call of every prediction endpoint against the types openapi-typescript generates from
// the live /openapi.json (schema.d.ts, written by the contract test; not committed). `tsc --noEmit`
// fails when the contract no longer has what a web or mobile client relies on here.
import type { components, paths } from "./schema";

type Problem = components["schemas"]["Problem"];
type Json<P extends keyof paths> = paths[P] extends { post: { responses: { 200: { content: { "application/json": infer T } } } } } ? T : never;
type JsonBody<P extends keyof paths> = paths[P] extends { post: { requestBody: { content: { "application/json": infer T } } } } ? T : never;

async function call<T>(url: string, init: RequestInit): Promise<{ body: T; version: string | null; requestId: string | null }> {
  const response = await fetch(url, init);
  if (!response.ok) {
    const problem: Problem = await response.json();
    throw new Error(`${problem.status} ${problem.code}: ${problem.detail} (${problem.field ?? "request"})`);
  }
  return { body: (await response.json()) as T, version: response.headers.get("X-Model-Version"), requestId: response.headers.get("X-Request-ID") };
}

function files(field: string, blobs: Blob[], params: Record<string, string> = {}): FormData {
  const form = new FormData();
  for (const blob of blobs) form.append(field, blob);
  for (const [name, value] of Object.entries(params)) form.append(name, value);
  return form;
}

export async function digits(base: string, drawings: Blob[]): Promise<string[]> {
  const { body } = await call<Json<"/v1/digits/predict">>(`${base}/v1/digits/predict`, { method: "POST", body: files("image", drawings) });
  const pixels: JsonBody<"/v1/digits/predict"> = { instances: [{ pixels: [[0, 255]] }] };
  void pixels;
  return body.predictions.map((p) => `${p.label} (${p.digit}) ${p.confidence.toFixed(2)} ${p.probabilities["7"] ?? 0}`);
}

export async function emotion(base: string, recording: Blob): Promise<string> {
  const { body, version } = await call<Json<"/v1/emotion/predict">>(`${base}/v1/emotion/predict`, { method: "POST", body: recording, headers: { "Content-Type": recording.type } });
  const clip = body.predictions[0];
  const windows = clip.segments.map((s) => `${s.start_s}-${s.end_s}: ${s.label} ${s.confidence}`);
  return `${clip.label} ${clip.confidence} ${clip.duration_s}s ${Object.keys(clip.probabilities).length} ${windows.join(", ")} v${version}`;
}

export async function segmentation(base: string, slice: Blob, threshold: number): Promise<string> {
  const { body } = await call<Json<"/v1/segmentation/predict">>(`${base}/v1/segmentation/predict?format=json&threshold=${threshold}`, { method: "POST", body: files("image", [slice]) });
  const mask = body.predictions[0];
  return `data:image/png;base64,${mask.mask_png_b64} ${mask.width}x${mask.height} ${mask.membrane_fraction} ${mask.threshold}`;
}

export async function segment(base: string, income: number, score: number): Promise<string> {
  const request: JsonBody<"/v1/clustering/predict"> = { instances: [{ annual_income: income, spending_score: score }] };
  const { body } = await call<Json<"/v1/clustering/predict">>(`${base}/v1/clustering/predict`, { method: "POST", body: JSON.stringify(request), headers: { "Content-Type": "application/json" } });
  const p = body.predictions[0];
  return `${p.segment} (cluster ${p.cluster}, ${p.distance} of ${p.distances.length})`;
}

export async function fit(base: string, rows: number[][]): Promise<number> {
  const request: JsonBody<"/v1/clustering/fit"> = { data: rows, k: null, k_min: 2, k_max: 6, scale: true };
  const { body } = await call<Json<"/v1/clustering/fit">>(`${base}/v1/clustering/fit`, { method: "POST", body: JSON.stringify(request), headers: { "Content-Type": "application/json" } });
  return body.predictions[0].k + body.predictions[0].labels.length + body.predictions[0].elbow.length;
}

export async function palette(base: string, photo: Blob): Promise<string[]> {
  const { body } = await call<Json<"/v1/clustering/palette">>(`${base}/v1/clustering/palette`, { method: "POST", body: files("image", [photo], { colors: "5" }) });
  return body.predictions[0].colors.map((c) => `${c.hex} ${c.rgb.join(",")} ${c.fraction}`);
}

export async function feedback(base: string, requestId: string, label: string): Promise<boolean> {
  const request: JsonBody<"/v1/feedback"> = { request_id: requestId, label, index: 0 };
  const { body } = await call<components["schemas"]["FeedbackOut"]>(`${base}/v1/feedback`, { method: "POST", body: JSON.stringify(request), headers: { "Content-Type": "application/json" } });
  return body.correct && !body.replaced;
}

export async function models(base: string): Promise<string[]> {
  const response = await fetch(`${base}/v1/models`);
  const list: components["schemas"]["ModelList"] = await response.json();
  return list.models.map((m) => `${m.task} ${m.version} ${m.ready} ${m.limits.map((l) => `${l.what}=${l.value}`).join("; ")}`);
}
