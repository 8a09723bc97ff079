// keyward dashboard: the only script, served from keyward itself (no CDN,
// no inline script). Copy buttons and confirmation prompts.
"use strict";
document.addEventListener("click", (ev) => {
  const b = ev.target.closest("button[data-copy]");
  if (!b) return;
  const input = document.getElementById(b.dataset.copy);
  if (!input) return;
  input.select();
  (navigator.clipboard ? navigator.clipboard.writeText(input.value) : Promise.reject())
    .then(() => { b.textContent = "Copied"; })
    .catch(() => { document.execCommand && document.execCommand("copy"); b.textContent = "Copied"; });
});
document.addEventListener("submit", (ev) => {
  const f = ev.target.closest("form[data-confirm]");
  if (f && !window.confirm(f.dataset.confirm)) ev.preventDefault();
});
