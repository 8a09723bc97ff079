"""Drives the providers' official Python SDKs through keyward's proxy.

Environment: KW_URL (keyward base URL), KW_TOKEN (the agent's kwa_ token),
KW_CA (keyward's CA file; SSL_CERT_FILE points there too, which is how an
unchanged agent trusts a private CA). The agent token goes exactly where each SDK puts
its API key; nothing else about the SDKs changes.
"""
import os
import ssl
import sys
import time
import urllib.request

KW, TOKEN, CA = os.environ["KW_URL"], os.environ["KW_TOKEN"], os.environ["KW_CA"]
ctx = ssl.create_default_context(cafile=CA)


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def release_last_chunk():
    req = urllib.request.Request(f"{KW}/proxy/openai/release", method="POST", headers={"Authorization": f"Bearer {TOKEN}"})
    urllib.request.urlopen(req, context=ctx, timeout=10).read()


def run_openai():
    import openai

    client = openai.OpenAI(api_key=TOKEN, base_url=f"{KW}/proxy/openai/v1", max_retries=0)
    r = client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}])
    check(r.choices[0].message.content == "Hello from the mock", f"chat: {r}")

    started = time.monotonic()
    stream = client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}], stream=True)
    it = iter(stream)
    first = next(it)
    first_after = time.monotonic() - started
    # The mock holds its last chunk back until released: a proxy that
    # buffered the answer would deliver nothing before the mock's 10 s cap.
    check(first_after < 5, f"first streamed chunk took {first_after:.1f}s")
    check(first.choices[0].delta.content == "Hel", f"first chunk: {first}")
    release_last_chunk()
    text = "Hel" + "".join(c.choices[0].delta.content or "" for c in it if c.choices)
    check(text == "Hello world", f"streamed text: {text!r}")

    e = client.embeddings.create(model="emb-x", input="hello")
    check(e.data[0].embedding == [0.25, -0.5, 1.0], f"embeddings: {e}")


def run_anthropic():
    import anthropic

    client = anthropic.Anthropic(api_key=TOKEN, base_url=f"{KW}/proxy/anthropic", max_retries=0)
    m = client.messages.create(model="claude-x", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    check(m.content[0].text == "Hello from the mock", f"messages: {m}")
    with client.messages.stream(model="claude-x", max_tokens=16, messages=[{"role": "user", "content": "hi"}]) as s:
        text = "".join(s.text_stream)
    check(text == "Hello there", f"streamed: {text!r}")


def run_stripe():
    import stripe

    # stripe-python's HTTP client reads its CA bundle from this setting.
    stripe.ca_bundle_path = CA
    client = stripe.StripeClient(TOKEN, base_addresses={"api": f"{KW}/proxy/stripe"}, max_network_retries=0)
    customers = client.v1.customers.list(params={"limit": 1})
    check(customers.data[0].id == "cus_1", f"customers: {customers}")


def run_slack():
    from slack_sdk import WebClient

    client = WebClient(token=TOKEN, base_url=f"{KW}/proxy/slack/api/", ssl=ctx)
    r = client.chat_postMessage(channel="C123", text="hi")
    check(r["ok"] and r["channel"] == "C123", f"slack: {r}")


for name in sys.argv[1:] or ["openai", "anthropic", "stripe", "slack"]:
    globals()[f"run_{name}"]()
    print(f"{name}: ok")
