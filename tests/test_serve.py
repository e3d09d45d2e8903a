"""--mode=serve against real clients: the official `openai` package, raw HTTP, a browser.

One server process (`main.py --mode=serve` on a tiny random-weight model) is shared by the
module's tests, which run on one xdist worker (group "serve"); the last test stops it with
SIGTERM. References are independent of the server: `sampling.generate` (what --mode=sample
runs) for the tokens, the plain model's forward pass for the log-probs, the tokenizer for the
prompt counts.
"""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

import helpers

from llm_jax import chat
from llm_jax import checkpoint
from llm_jax import config
from llm_jax import data as data_lib
from llm_jax import loader
from llm_jax import model as model_lib
from llm_jax import sampling
from llm_jax import sharding
from llm_jax import tokenizer as tokenizer_lib
from llm_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "configs", "base.py")
pytestmark = [pytest.mark.xdist_group("serve"),
              pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")]
# Context 128 (prompt buckets 16, 32, 64, 128); 4 slots, so 32 requests queue.
TINY = dict(vocab_size=128, vocab_multiple=64, byte_fallback=False, d_model=32, n_heads=2,
            n_layers=2, max_seq_len=128, micro_batch_size=4, num_train_steps=8, eval_steps=0,
            sample_every_eval=False)
SERVE = dict(serve_slots=4, serve_max_queue=40, serve_max_n=8, serve_max_body_bytes=20000,
             serve_max_tokens=120, serve_model_name="tiny")
PROMPTS = ["Kalo mine", "Ruvi sato kane", "De"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")


def _make_workdir(root):
  """A workdir with a tokenizer and a checkpoint of random params (spread enough that greedy
  text varies), as training leaves it."""
  helpers.write_corpus(os.path.join(root, "text"))
  fields = {**TINY, "dataset": f"text:{root}/text/train", "validation": f"{root}/text/val/*.txt",
            "data_dir": os.path.join(root, "data")}
  cfg = config.load(BASE, **fields)
  workdir = os.path.join(root, "run")
  data = data_lib.build(cfg, workdir, 0, 1)
  trainer = train.Trainer(cfg, cfg.num_train_steps,
                          mesh=sharding.make_mesh(cfg, jax.devices()[:1]))
  params = helpers.random_params(trainer.abstract_params, std=0.3)
  state = train.TrainState(step=jnp.asarray(4, jnp.int32), params=params,
                           opt_state=trainer.tx.init(params), rng=jax.random.key(0))
  # The tokenizer carries a chat template, as an imported model's tokenizer_config.json does.
  own = tokenizer_lib.load(os.path.join(workdir, "tokenizer.model"))
  special = {"bos": own.bos_id, "eos": own.eos_ids, "pad": own.pad_id, "unk": own.unk_id}
  tok = tokenizer_lib.Tokenizer(own.model_proto, special, False, {"chat_template": CHATML})
  ckpt = checkpoint.Checkpointer(workdir, cfg, data.steps_per_epoch, tok)
  try:
    ckpt.save(4, state, data.train_iter())
  finally:
    ckpt.close()
  return fields, workdir


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Served:
  def __init__(self, proc, url, workdir, loaded, log_path):
    self.proc, self.url, self.workdir, self.loaded, self.log_path = proc, url, workdir, loaded, log_path
    self.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    self.compiles_at_start = None

  def log(self):
    with open(self.log_path, encoding="utf-8") as f:
      return f.read()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("serve"))
  fields, workdir = _make_workdir(root)
  port = _free_port()
  flags = [f"--config.{k}={v}" for k, v in {**fields, **SERVE, "serve_port": port}.items()]
  env = helpers.child_env()
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("LLM_JAX_SERVE_API_KEY", None)
  log_path = os.path.join(root, "server.log")
  with open(log_path, "w", encoding="utf-8") as log:
    proc = subprocess.Popen([sys.executable, "main.py", f"--config={BASE}", f"--workdir={workdir}",
                             "--mode=serve", *flags], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  # Meanwhile, this process loads the same model for the references.
  loaded = loader.load(workdir, config.load(BASE, **fields))
  s = Served(proc, url, workdir, loaded, log_path)
  deadline = time.time() + 240
  while True:
    assert proc.poll() is None, s.log()
    try:
      if httpx.get(url + "/health", timeout=2).status_code == 200:
        break
    except httpx.HTTPError:
      pass
    assert time.time() < deadline, s.log()
    time.sleep(0.3)
  s.compiles_at_start = _metric(s, "llm_jax_serve_jit_compiles")
  yield s
  if proc.poll() is None:
    proc.kill()
    proc.wait()


def _metrics(s):
  return httpx.get(s.url + "/metrics").text


def _metric(s, name, labels=""):
  text = _metrics(s)
  m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
  return float(m.group(1)) if m else 0.0


def _ids(s, text):
  tok = s.loaded.tokenizer
  return tok.encode(text, add_bos=tok.add_bos) or [tok.eos_id]


def _reference(s, prompt, scfg, seed=0):
  lo = s.loaded
  return sampling.generate(lo.params, lo.model_cfg, [_ids(s, prompt)], scfg, jax.random.key(seed),
                           eos_id=lo.tokenizer.eos_ids)


def _background_load(s, stop_event):
  """Streams sampled requests until stop_event: other traffic in the slots meanwhile."""
  client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
  while not stop_event.is_set():
    for _ in client.completions.create(model="tiny", prompt="Sato kalo", max_tokens=40,
                                       temperature=1.0, stream=True):
      pass


def test_greedy_and_seeded_tokens_equal_the_sampler_whatever_else_is_served(served):
  stop = threading.Event()
  load = [threading.Thread(target=_background_load, args=(served, stop)) for _ in range(3)]
  for t in load:
    t.start()
  try:
    for prompt in PROMPTS:
      out = served.client.completions.create(model="tiny", prompt=prompt, max_tokens=20,
                                             temperature=0, extra_body={"return_token_ids": True})
      ref = _reference(served, prompt, sampling.SamplingConfig(max_new_tokens=20, do_sample=False))
      assert out.choices[0].model_extra["token_ids"] == ref[0]
    scfg = sampling.SamplingConfig(max_new_tokens=24, do_sample=True, temperature=0.9, top_k=20,
                                   top_p=0.9, repetition_penalty=1.3, min_length=5,
                                   num_return_sequences=3)
    for seed in (3, 11):
      out = served.client.completions.create(
          model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0.9, top_p=0.9, n=3,
          seed=seed, extra_body={"return_token_ids": True, "top_k": 20,
                                 "repetition_penalty": 1.3, "min_tokens": 5})
      ref = _reference(served, PROMPTS[0], scfg, seed)
      assert [c.model_extra["token_ids"] for c in out.choices] == ref
      assert len({tuple(r) for r in ref}) == 3  # three distinct streams
  finally:
    stop.set()
    for t in load:
      t.join()


def test_completions_stream_equals_non_stream_with_usage_stop_and_logprobs(served):
  # The first seed from 5 whose sample has 3 words (for the stop string below): which one
  # depends on the tokenizer the fixture trains, not on what is tested.
  for seed in range(5, 25):
    kw = dict(model="tiny", prompt=PROMPTS[1], max_tokens=30, temperature=0.8, seed=seed)
    full = served.client.completions.create(**kw, logprobs=3,
                                            extra_body={"return_token_ids": True})
    c = full.choices[0]
    if len(c.text.split()) >= 3:
      break
  ids = c.model_extra["token_ids"]
  assert full.usage.prompt_tokens == len(_ids(served, PROMPTS[1]))
  assert full.usage.completion_tokens == len(ids)
  assert full.usage.total_tokens == full.usage.prompt_tokens + len(ids)
  assert c.finish_reason == ("stop" if ids[-1] in served.loaded.tokenizer.eos_ids else "length")
  # Log-probs: the plain model's distribution over the same tokens.
  lo = served.loaded
  seq = _ids(served, PROMPTS[1]) + ids
  logits = model_lib.build(lo.model_cfg).apply({"params": lo.params}, jnp.asarray([seq]))
  logp = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32)))
  p = len(seq) - len(ids)
  want = [logp[p - 1 + i, t] for i, t in enumerate(ids)]
  np.testing.assert_allclose(c.logprobs.token_logprobs, want, atol=2e-4)
  for i, top in enumerate(c.logprobs.top_logprobs):
    np.testing.assert_allclose(sorted(top.values(), reverse=True),
                               np.sort(logp[p - 1 + i])[::-1][:len(top)], atol=2e-4)
    assert len(top) <= 3
  # Streaming gives the same text, chunk by chunk.
  chunks = list(served.client.completions.create(**kw, stream=True))
  assert "".join(ch.choices[0].text for ch in chunks) == c.text
  assert chunks[-1].choices[0].finish_reason == c.finish_reason
  assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])
  # A stop string ends the text just before it (same seed, same tokens up to there).
  words = c.text.split()
  assert len(words) >= 3, c.text
  stop = " " + words[2]
  cut = served.client.completions.create(**kw, stop=[stop, "zzzz"])
  assert cut.choices[0].finish_reason == "stop"
  assert cut.choices[0].text == c.text[:c.text.index(stop)]
  streamed = list(served.client.completions.create(**kw, stop=stop, stream=True))
  assert "".join(ch.choices[0].text for ch in streamed) == cut.choices[0].text


def test_chat_completions_render_the_models_template_stream_and_not(served):
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[0]}]
  # ChatML, written out by hand: what the template must render, generation prompt included.
  text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nKalo mine<|im_end|>\n"
          "<|im_start|>assistant\n")
  tok = served.loaded.tokenizer
  ids = tok.encode(text)
  ends = chat.end_of_turn_ids(tok, CHATML)  # a reply ends at <|im_end|> too
  kw = dict(model="tiny", messages=messages, max_tokens=20, temperature=0)
  out = served.client.chat.completions.create(**kw, logprobs=True, top_logprobs=2,
                                              extra_body={"return_token_ids": True})
  ref = sampling.generate(served.loaded.params, served.loaded.model_cfg, [ids],
                          sampling.SamplingConfig(max_new_tokens=20, do_sample=False),
                          jax.random.key(0), eos_id=ends)[0]
  c = out.choices[0]
  assert c.model_extra["token_ids"] == ref
  assert c.message.role == "assistant"
  assert c.message.content.strip() == tok.decode([t for t in ref if t not in ends]).strip()
  assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), len(ref))
  assert c.finish_reason == ("stop" if ref[-1] in ends else "length")
  # Greedy picks the most likely token: its log-prob is the best of the alternatives.
  assert len(c.logprobs.content) == len(ref)
  for entry in c.logprobs.content:
    assert len(entry.top_logprobs) == 2
    assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)
  chunks = list(served.client.chat.completions.create(**kw, stream=True,
                                                      stream_options={"include_usage": True}))
  assert chunks[0].choices[0].delta.role == "assistant"
  with_choices = [ch for ch in chunks if ch.choices]
  assert "".join(ch.choices[0].delta.content or "" for ch in with_choices) == c.message.content
  assert with_choices[-1].choices[0].finish_reason == c.finish_reason
  assert chunks[-1].usage.completion_tokens == len(ref)


def test_a_new_request_joins_while_a_long_one_keeps_decoding(served):
  """Continuous batching: a short request sent while a long one runs is admitted into a free
  slot and comes back while the long one is still decoding; the long one's tokens are
  unchanged by it (seeded). A static batch would hold the short one until the long one ended."""
  long_kw = dict(model="tiny", prompt=PROMPTS[2], max_tokens=110, temperature=1.0, seed=7,
                 extra_body={"min_tokens": 110, "return_token_ids": True})
  alone = served.client.completions.create(**long_kw).choices[0].model_extra["token_ids"]
  arrivals, got, started = [], [], threading.Event()

  def read_long():
    for chunk in served.client.completions.create(**long_kw, stream=True):
      got.extend(chunk.choices[0].model_extra.get("token_ids") or [])
      arrivals.append(time.monotonic())
      started.set()

  reader = threading.Thread(target=read_long)
  reader.start()
  assert started.wait(60)
  sent = time.monotonic()
  # Its top-p and top-k make every slot's step take the filtering path: the long one (neither)
  # must come out of it untouched.
  short = served.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=3,
                                           top_p=0.5, extra_body={"min_tokens": 3, "top_k": 5})
  back = time.monotonic()
  reader.join(60)
  assert short.usage.completion_tokens == 3
  assert got == alone
  assert arrivals[0] < sent and sum(t > back for t in arrivals) > 0, (sent, back, arrivals)


def test_32_concurrent_streams_complete_with_correct_usage(served):
  client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
  before = _metric(served, "llm_jax_serve_generation_tokens_total")

  async def one(i):
    prompt = f"{PROMPTS[i % 3]} {'ka ' * (i % 7)}".strip()
    n_tokens = 8 + i % 13
    text, usage, finish = "", None, None
    stream = await client.completions.create(
        model="tiny", prompt=prompt, max_tokens=n_tokens, temperature=1.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"min_tokens": n_tokens})
    async for chunk in stream:
      if chunk.usage is not None:
        usage = chunk.usage
      for c in chunk.choices:
        text += c.text
        finish = c.finish_reason or finish
    return prompt, n_tokens, usage, finish

  async def all_of_them():
    return await asyncio.gather(*(one(i) for i in range(32)))

  results = asyncio.run(all_of_them())
  for prompt, n_tokens, usage, finish in results:
    assert finish == "length"
    assert usage.completion_tokens == n_tokens
    assert usage.prompt_tokens == len(_ids(served, prompt))
  total = sum(r[1] for r in results)
  assert _metric(served, "llm_jax_serve_generation_tokens_total") - before == total
  assert _metric(served, "llm_jax_serve_running_slots") == 0


def _post(served, path, body, headers=None, raw=False):
  data = body if raw else json.dumps(body)
  return httpx.post(served.url + path, content=data,
                    headers={"content-type": "application/json", **(headers or {})}, timeout=30)


BAD = [
    ("malformed JSON", b'{"prompt": "x", ', 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("a number as a string", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("temperature of the wrong type", {"prompt": "x", "temperature": [1]}, 400, "temperature"),
    ("a prompt over the context", {"prompt": "ka " * 400}, 400, "prompt"),
    ("max_tokens past the context", {"prompt": "ka " * 40, "max_tokens": 110}, 400,
     "max_tokens"),
    ("n over the limit", {"prompt": "Kalo", "n": 9}, 400, "n"),
    ("max_tokens over the limit", {"prompt": "Kalo", "max_tokens": 124}, 400, "max_tokens"),
    ("a token id outside the vocabulary", {"prompt": [5, 999]}, 400, "prompt"),
    ("an empty prompt list", {"prompt": []}, 400, "prompt"),
    ("presence penalty", {"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("a body over the size limit", {"prompt": "ka " * 8000}, 413, None),
    ("an unknown model", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("an empty message list", {"messages": []}, 400, "messages"),
    ("a message of an unknown role", {"messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages.0.role"),
    ("chat max_tokens past the context",
     {"messages": [{"role": "user", "content": "ka " * 40}], "max_tokens": 110}, 400,
     "max_tokens"),
]


@pytest.mark.parametrize("what,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served, what, body, status,
                                                                     param):
  route = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else (
      "/v1/completions")
  r = _post(served, route, body, raw=isinstance(body, bytes))
  assert r.status_code == status, (what, r.text)
  err = r.json()["error"]
  if what.endswith("over the limit"):  # the server's own limit, not the context
    assert "serve_max" in err["message"], err
  if what.endswith("past the context"):
    assert "context length" in err["message"], err
  assert err["message"] and err["type"] == "invalid_request_error", err
  if param:
    assert err["param"] == param, err
  ok = _post(served, "/v1/completions", {"prompt": "Kalo", "max_tokens": 2})
  assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_unknown_route_and_models(served):
  r = httpx.get(served.url + "/v1/nothing")
  assert r.status_code == 404 and "error" in r.json()
  models = served.client.models.list()
  assert [m.id for m in models.data] == ["tiny"]


def test_a_full_queue_answers_429_with_retry_after(served):
  # 10 requests of 8 sequences each: 80 against 4 slots + a queue of 40.
  async def fire():
    async with httpx.AsyncClient(timeout=60) as client:
      return await asyncio.gather(*(client.post(
          served.url + "/v1/completions",
          json={"prompt": "Kalo", "max_tokens": 100, "min_tokens": 100, "n": 8})
          for _ in range(10)))
  rs = asyncio.run(fire())
  codes = sorted(r.status_code for r in rs)
  assert 429 in codes and 200 in codes, codes
  busy = next(r for r in rs if r.status_code == 429)
  assert busy.headers["retry-after"] == "1"
  assert busy.json()["error"]["type"] == "rate_limit_error"
  for r in rs:
    if r.status_code == 200:
      assert all(len(c["text"]) > 0 for c in r.json()["choices"])


def test_a_client_that_disconnects_cancels_its_request(served):
  # 8 choices of 120 tokens over 4 slots: 960 tokens, half of them queued behind the others.
  before = _metric(served, "llm_jax_serve_generation_tokens_total")
  with httpx.Client(timeout=30) as client:
    with client.stream("POST", served.url + "/v1/completions",
                       json={"prompt": "Kalo", "max_tokens": 120, "min_tokens": 120, "n": 8,
                             "stream": True}) as r:
      next(r.iter_lines())  # the first token has arrived; then hang up
  deadline = time.time() + 20
  while _metric(served, "llm_jax_serve_running_slots") and time.time() < deadline:
    time.sleep(0.05)
  assert _metric(served, "llm_jax_serve_running_slots") == 0
  # Served to the end, the request would have generated all 960 (min_tokens keeps EOS away).
  assert _metric(served, "llm_jax_serve_generation_tokens_total") - before < 960


def test_metrics_count_a_request(served):
  m = lambda name, labels="": _metric(served, name, labels)
  ok = 'llm_jax_serve_requests_total', '{route="/v1/completions",status="200"}'
  before = [m(*ok), m("llm_jax_serve_prompt_tokens_total"),
            m("llm_jax_serve_time_to_first_token_seconds_count")]
  out = served.client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=6, n=2)
  after = [m(*ok), m("llm_jax_serve_prompt_tokens_total"),
           m("llm_jax_serve_time_to_first_token_seconds_count")]
  assert after[0] - before[0] == 1
  assert after[1] - before[1] == out.usage.prompt_tokens
  assert after[2] - before[2] == 2
  text = _metrics(served)
  for name in ("llm_jax_serve_queue_depth", "llm_jax_serve_inter_token_latency_seconds_bucket"):
    assert name in text


def _browser():
  """Headless Chromium (the system's) through selenium, or a skip saying what is missing."""
  import shutil  # pylint: disable=g-import-not-at-top
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome import service  # pylint: disable=g-import-not-at-top
  binary = shutil.which("chromium") or shutil.which("chromium-browser")
  driver = shutil.which("chromedriver")
  if not (binary and driver):
    pytest.skip("no system Chromium + chromedriver (Debian: apt-get install chromium "
                "chromium-driver; .ci/run installs them)")
  options = webdriver.ChromeOptions()
  options.binary_location = binary
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1100,800"):
    options.add_argument(arg)
  return webdriver.Chrome(options=options, service=service.Service(driver))


def test_the_playground_streams_in_a_browser_and_stop_cancels(served, tmp_path):
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support import ui  # pylint: disable=g-import-not-at-top
  before = _metric(served, "llm_jax_serve_generation_tokens_total")
  browser = _browser()
  try:
    browser.get(served.url + "/")
    wait = ui.WebDriverWait(browser, 30, poll_frequency=0.05)
    wait.until(lambda b: b.find_element(By.ID, "model").text == "tiny", "the model's name")
    for field, value in (("prompt", PROMPTS[1]), ("max_tokens", "120"), ("min_tokens", "120")):
      box = browser.find_element(By.ID, field)
      box.clear()
      box.send_keys(value)
    # Stop is pressed the moment streamed text shows (from inside the page: a round trip
    # through the driver could outlast the tiny model's 120 tokens).
    browser.execute_script("""
      const out = document.getElementById("output"), n = arguments[0];
      new MutationObserver((_, obs) => {
        if (out.textContent.length > n) { obs.disconnect(); document.getElementById("stop").click(); }
      }).observe(out, {childList: true, subtree: true, characterData: true});""", len(PROMPTS[1]) + 3)
    browser.find_element(By.ID, "send").click()
    wait.until(lambda b: "stopped" in b.find_element(By.ID, "stats").text, "stopped")
    assert "time to first token" in browser.find_element(By.ID, "stats").text
    shown = browser.find_element(By.ID, "output").text
    assert shown.startswith(PROMPTS[1]) and len(shown) > len(PROMPTS[1])
    png = browser.get_screenshot_as_png()
    (tmp_path / "playground.png").write_bytes(png)
  finally:
    browser.quit()
  colors = Image.open(io.BytesIO(png)).convert("RGB").getcolors(maxcolors=1 << 20)
  assert colors is not None and len(colors) > 20  # text and widgets, not a blank page
  # Stop cancelled the request: its slot is freed long before its 120 tokens.
  deadline = time.time() + 20
  while _metric(served, "llm_jax_serve_running_slots") and time.time() < deadline:
    time.sleep(0.05)
  assert _metric(served, "llm_jax_serve_running_slots") == 0
  assert _metric(served, "llm_jax_serve_generation_tokens_total") - before < 120


def test_nothing_compiled_after_warmup(served):
  # Every test above ran through the server: new prompt lengths, knobs, seeds, n, slots.
  assert served.compiles_at_start > 0
  assert _metric(served, "llm_jax_serve_jit_compiles") == served.compiles_at_start


def test_sigterm_finishes_requests_in_flight_then_exits_0(served):
  """Last: it stops the shared server."""
  with httpx.Client(timeout=60) as client:
    with client.stream("POST", served.url + "/v1/completions",
                       json={"prompt": "Kalo", "max_tokens": 100, "min_tokens": 100,
                             "stream": True, "stream_options": {"include_usage": True}}) as r:
      lines = r.iter_lines()
      next(lines)
      served.proc.send_signal(signal.SIGTERM)
      rest = [l for l in lines if l.startswith("data: ")]
  assert rest[-1] == "data: [DONE]"
  assert json.loads(rest[-2][6:])["usage"]["completion_tokens"] == 100
  assert served.proc.wait(timeout=60) == 0, served.log()
  with pytest.raises(httpx.ConnectError):
    httpx.get(served.url + "/health")


def test_a_bug_in_one_request_is_a_500_and_the_next_is_served(caplog):
  """In-process, over a stand-in engine whose submit fails for one prompt."""
  import types  # pylint: disable=g-import-not-at-top
  from fastapi import testclient  # pylint: disable=g-import-not-at-top
  from llm_jax.serve import api  # pylint: disable=g-import-not-at-top

  def submit(seqs):
    if seqs[0].prompt == [7]:
      raise RuntimeError("a bug")
    for s in seqs:
      s.tokens.append(3)
      s.text, s.finish_reason = "x", "length"
      s.emit(("done", "length"))
  stub = types.SimpleNamespace(context=64, running=lambda: 0, queue_depth=lambda: 0,
                               submit=submit, cancel=lambda seqs: None,
                               model_cfg=types.SimpleNamespace(vocab_size=10))
  server = api.Server(stub, None, model_name="m", max_tokens=64, max_n=1, max_body_bytes=1000,
                      api_key=None)
  client = testclient.TestClient(api.build_app(server), raise_server_exceptions=False)
  r = client.post("/v1/completions", json={"prompt": [7], "max_tokens": 1})
  assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error", r.text
  assert "a bug" in caplog.text  # logged with its traceback
  ok = client.post("/v1/completions", json={"prompt": [5], "max_tokens": 1})
  assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "x", ok.text


def test_an_api_key_is_required_on_v1_when_set():
  """In-process, over a stand-in engine: the key check comes before any decoding."""
  import types  # pylint: disable=g-import-not-at-top
  from fastapi import testclient  # pylint: disable=g-import-not-at-top
  from llm_jax.serve import api  # pylint: disable=g-import-not-at-top
  stub = types.SimpleNamespace(context=64, running=lambda: 0, queue_depth=lambda: 0)
  server = api.Server(stub, None, model_name="m", max_tokens=64, max_n=1, max_body_bytes=1000,
                      api_key="s3cret")
  client = testclient.TestClient(api.build_app(server))
  for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
    r = client.get("/v1/models", headers=headers)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert client.post("/v1/completions", json={"prompt": "x"}, headers=headers).status_code == 401
  assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
  assert client.get("/health").status_code == 200  # probes need no key
