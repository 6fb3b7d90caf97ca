import { models, setupApiKey } from "./api.js";
import { setup as clustering } from "./clustering.js";
import { setup as digits } from "./digits.js";
import { setup as emotion } from "./emotion.js";
import { setup as segmentation } from "./segmentation.js";

setupApiKey();
digits();
emotion();
segmentation();
clustering();

models().then((list) => {
  document.getElementById("versions").textContent = "Models: " + list
    .map((m) => `${m.task} ${m.version ?? "?"}${m.ready ? "" : " (not loaded)"}`).join(" · ");
}).catch(() => {
  document.getElementById("versions").textContent = "Model versions unavailable.";
});
