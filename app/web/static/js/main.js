import { models, setupApiKey } from "./api.js";

setupApiKey();

// Each task's panel names its module; one that fails to load leaves the others working.
for (const section of document.querySelectorAll("section[data-module]")) {
  try {
    const { setup } = await import(section.dataset.module);
    setup(section);
  } catch (error) {
    const note = document.createElement("p");
    note.className = "problem";
    note.textContent = "This panel could not start: " + error.message;
    section.append(note);
  }
}

models().then((list) => {
  document.getElementById("versions").textContent = "Models: " + list
    .map((m) => `${m.task} ${m.version ?? "?"}${m.ready ? "" : " (not loaded)"}`).join(" · ");
}).catch(() => {
  document.getElementById("versions").textContent = "Model versions unavailable.";
});
