// The official openai npm package through keyward's proxy, once.
// Env: KW_URL, KW_TOKEN; NODE_EXTRA_CA_CERTS points at keyward's CA.
import OpenAI from "openai";

const client = new OpenAI({ apiKey: process.env.KW_TOKEN, baseURL: `${process.env.KW_URL}/proxy/openai/v1`, maxRetries: 0 });
const r = await client.chat.completions.create({ model: "gpt-x", messages: [{ role: "user", content: "hi" }] });
if (r.choices[0].message.content !== "Hello from the mock") {
  console.error("FAILED", JSON.stringify(r));
  process.exit(1);
}
console.log("node openai: ok");
