// The dashboard in real headless Chromium (driven by playwright-core):
// log in, create a secret, rotate it, grant it to an agent, disable the
// agent, filter the audit log, log out; an auditor sees but cannot change;
// a POST without the CSRF token is refused. Screenshots of every page at
// desktop and phone widths go to $SHOTS. Prints "ok: <step>" per step.
import { chromium } from "playwright-core";
import assert from "node:assert/strict";

const { KW_URL, CHROMIUM, SHOTS, ADMIN, AUDITOR, PASSWORD, VALUE1, VALUE2 } = process.env;
const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ["--no-sandbox"] });
const step = (s) => console.log(`ok: ${s}`);

async function session(name, viewport) {
  const ctx = await browser.newContext({ ignoreHTTPSErrors: true, viewport });
  const page = await ctx.newPage();
  const errors = [];
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  page.on("dialog", (d) => d.accept());
  await page.goto(`${KW_URL}/ui/login`);
  await page.fill("input[name=name]", name);
  await page.fill("input[name=password]", PASSWORD);
  await Promise.all([page.waitForURL(`${KW_URL}/ui/`), page.click("button[type=submit]")]);
  return { ctx, page, errors };
}

async function shot(page, name) {
  await page.screenshot({ path: `${SHOTS}/${name}.png`, fullPage: true });
}

function noValue(html, where) {
  for (const v of [VALUE1, VALUE2]) assert(!html.includes(v), `${where} shows a stored value`);
}

// The admin's walk through the main flow, at desktop width.
{
  const { ctx, page, errors } = await session(ADMIN, { width: 1280, height: 900 });
  step("log in");
  await shot(page, "desktop-overview");
  await page.goto(`${KW_URL}/ui/secrets`);
  await page.fill("#create-secret input[name=name]", "browser-made");
  await page.fill("#create-secret input[name=value]", VALUE1);
  await Promise.all([page.waitForURL(/\/ui\/secrets\/browser-made$/), page.click("#create-secret button[type=submit]")]);
  noValue(await page.content(), "secret page after create");
  assert.equal(await page.inputValue("#rotate input[name=value]"), "", "the value input is never prefilled");
  step("create a secret");
  await page.fill("#rotate input[name=value]", VALUE2);
  await page.check("#rotate input[name=confirm]");
  await Promise.all([page.waitForNavigation(), page.click("#rotate button[type=submit]")]);
  assert.match(await page.textContent("#versions"), /v2/);
  noValue(await page.content(), "secret page after rotate");
  step("rotate it");
  await page.selectOption("#grant select[name=agent]", "bot");
  await page.check("#grant input[name=reveal]");
  await Promise.all([page.waitForNavigation(), page.click("#grant button[type=submit]")]);
  assert.match(await page.textContent("#grants"), /bot/);
  await shot(page, "desktop-secret");
  step("grant it to an agent");
  await page.goto(`${KW_URL}/ui/agents`);
  await Promise.all([page.waitForNavigation(), page.click("#agents tr:has-text('bot') button:has-text('Disable')")]);
  assert.match(await page.textContent("#agents"), /disabled/);
  await shot(page, "desktop-agents");
  step("disable the agent");
  await page.goto(`${KW_URL}/ui/audit`);
  await page.fill("#audit-filter input[name=action]", "secret.rotate");
  await Promise.all([page.waitForNavigation(), page.click("#audit-filter button[type=submit]")]);
  const rows = await page.locator("table.events tr").count();
  assert(rows >= 2, "the filter finds the rotation");
  assert.match(await page.textContent("table.events"), /user:/);
  assert.match(await page.textContent("#chain"), /Chain verified/);
  await shot(page, "desktop-audit");
  step("filter the audit log");
  await page.goto(`${KW_URL}/ui/alerts`);
  await shot(page, "desktop-alerts");
  await page.goto(`${KW_URL}/ui/secrets`);
  await shot(page, "desktop-secrets");
  // A POST without the CSRF token is refused, even with the session cookie.
  const forged = await page.request.post(`${KW_URL}/ui/agents/bot/enable`, { form: { csrf: "" }, maxRedirects: 0 });
  assert.equal(forged.status(), 403);
  assert.match(await page.textContent("#secrets"), /browser-made/);
  step("a POST without the CSRF token is refused");
  await Promise.all([page.waitForURL(`${KW_URL}/ui/login`), page.click("nav button:has-text('Log out')")]);
  await page.goto(`${KW_URL}/ui/`);
  assert(page.url().endsWith("/ui/login"), "logged out");
  await shot(page, "desktop-login");
  step("log out");
  assert.deepEqual(errors, [], "no console errors (CSP violations included)");
  await ctx.close();
}

// The auditor, at phone width: every page renders, nothing can be changed.
{
  const { ctx, page, errors } = await session(AUDITOR, { width: 390, height: 844 });
  for (const [path, name] of [["/ui/", "overview"], ["/ui/secrets", "secrets"], ["/ui/secrets/browser-made", "secret"],
                              ["/ui/agents", "agents"], ["/ui/audit", "audit"], ["/ui/alerts", "alerts"]]) {
    await page.goto(`${KW_URL}${path}`);
    noValue(await page.content(), path);
    await shot(page, `phone-${name}`);
  }
  await page.goto(`${KW_URL}/ui/secrets/browser-made`);
  assert.equal(await page.locator("#rotate").count(), 0, "no rotate form for an auditor");
  assert.equal(await page.locator("#grant").count(), 0, "no grant form for an auditor");
  const width = await page.evaluate(() => document.documentElement.scrollWidth);
  assert(width <= 400, `the page fits a phone (scroll width ${width})`);
  step("an auditor sees but cannot change");
  assert.deepEqual(errors, []);
  await ctx.close();
}
await browser.close();
console.log("ok: done");
