//! The `serve` binary on real models (SmolLM2-135M-Instruct with its GGUF blocks kept,
//! the pretrained MiniLM), driven over HTTP on 127.0.0.1 with free ports: batching
//! equivalence, cancellation on disconnect, backpressure, errors and auth, graceful
//! shutdown, a load test, and the official `openai` Python package as the client.
//! (Compiled as a test of the `serve` package, which provides CARGO_BIN_EXE_serve.)

mod common;
#[path = "common/sentiment.rs"]
mod sentiment;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn sibling(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_serve")).with_file_name(name)
}

/// SmolLM2-135M-Instruct's shipped Q4_1 GGUF as a Kiln directory (blocks kept), once
/// per test binary.
fn smollm2() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let gguf =
            common::repo_root().join("datasets/pretrained/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            gguf.exists(),
            "{} is missing: run scripts/fetch-llms.sh",
            gguf.display()
        );
        let dir = common::scratch_dir("serve-smollm2").join("smollm2");
        let out = Command::new(sibling("convert"))
            .args([
                "--input",
                gguf.to_str().unwrap(),
                "--output",
                dir.to_str().unwrap(),
                "--keep-quantized",
            ])
            .output()
            .expect("convert runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        dir
    })
}

/// A running `serve` process, killed when dropped.
struct Server {
    child: Child,
    port: u16,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(model: &Path, args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_serve"))
            .args(["--model", model.to_str().unwrap(), "--port", "0"])
            .args(args)
            .env_remove("RUST_BACKTRACE")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("serve starts");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let port: u16 = rest.split(&[':', ' '][..]).nth(1).unwrap().parse().unwrap();
                    let _ = tx.send(port);
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let port = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| {
            panic!("serve did not start listening: {}", log.lock().unwrap());
        });
        let server = Server { child, port, log };
        let started = Instant::now();
        while server.get("/health").status != 200 {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "not ready: {}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn connect(&self) -> TcpStream {
        connect(self.port, Duration::from_secs(300))
    }

    fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> TcpStream {
        let mut s = self.connect();
        write_request(&mut s, method, path, headers, body);
        s
    }

    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Response {
        read_response(self.send(method, path, headers, body))
    }

    fn get(&self, path: &str) -> Response {
        self.request("GET", path, &[], "")
    }

    fn post(&self, path: &str, body: &Value) -> Response {
        self.request("POST", path, &[], &body.to_string())
    }

    /// A streamed request's events as they come.
    fn stream(&self, path: &str, body: &Value) -> Events {
        let s = self.send("POST", path, &[], &body.to_string());
        let mut reader = BufReader::new(s);
        let (status, head) = read_head(&mut reader);
        assert_eq!(status, 200, "{head}");
        assert!(head.contains("text/event-stream"), "{head}");
        Events(BufReader::new(Chunked::new(reader)))
    }

    /// The sum of a Prometheus metric's series (every label set).
    fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").body;
        text.lines()
            .filter(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ' | b'{')))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Wait until `check` holds (at most `secs`).
    fn wait_for(&self, secs: u64, what: &str, mut check: impl FnMut(&Server) -> bool) {
        let started = Instant::now();
        while !check(self) {
            assert!(started.elapsed() < Duration::from_secs(secs), "{what} within {secs} s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Response {
    status: u16,
    head: String,
    body: String,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {} {}", self.status, self.body))
    }
}

fn connect(port: u16, read_timeout: Duration) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connects");
    s.set_read_timeout(Some(read_timeout)).unwrap();
    s
}

/// One HTTP/1.1 request with a JSON body on `s` (the connection closes after the answer).
fn write_request(s: &mut TcpStream, method: &str, path: &str, headers: &[(&str, &str)], body: &str) {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
}

/// The whole answer on `s`: status, lower-cased head, body (chunked or not).
fn read_response(s: TcpStream) -> Response {
    let mut reader = BufReader::new(s);
    let (status, head) = read_head(&mut reader);
    let mut body = Vec::new();
    if head.contains("transfer-encoding: chunked") {
        Chunked::new(reader).read_to_end(&mut body).unwrap();
    } else {
        reader.read_to_end(&mut body).unwrap();
    }
    Response {
        status,
        head,
        body: String::from_utf8(body).unwrap(),
    }
}

fn read_head(reader: &mut impl BufRead) -> (u16, String) {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
            break;
        }
        head += &line.to_ascii_lowercase();
    }
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head)
}

/// HTTP/1.1 chunked transfer decoding.
struct Chunked<R> {
    inner: R,
    left: usize,
    done: bool,
}

impl<R: BufRead> Chunked<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            left: 0,
            done: false,
        }
    }
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            self.inner.read_line(&mut line)?;
            if line == "\r\n" {
                line.clear();
                self.inner.read_line(&mut line)?;
            }
            let size = usize::from_str_radix(line.trim(), 16).unwrap_or(0);
            if size == 0 {
                self.done = true;
                return Ok(0);
            }
            self.left = size;
        }
        let take = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..take])?;
        self.left -= n;
        if self.left == 0 {
            let mut crlf = [0u8; 2];
            self.inner.read_exact(&mut crlf)?;
        }
        Ok(n)
    }
}

/// Server-sent events: each `data:` payload.
struct Events(BufReader<Chunked<BufReader<TcpStream>>>);

impl Iterator for Events {
    type Item = String;
    fn next(&mut self) -> Option<String> {
        loop {
            let mut line = String::new();
            if self.0.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if let Some(data) = line.strip_prefix("data: ") {
                return Some(data.trim_end().to_string());
            }
        }
    }
}

fn completion(prompt: &str, max_tokens: usize) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

/// A streamed completion read to its end: the text, the finish reason and whether
/// `[DONE]` came.
fn read_stream(events: Events) -> (String, Option<String>, bool) {
    let (mut text, mut finish, mut done) = (String::new(), None, false);
    for data in events {
        if data == "[DONE]" {
            done = true;
            break;
        }
        let v: Value = serde_json::from_str(&data).unwrap();
        assert!(v.get("error").is_none(), "{v}");
        for c in v["choices"].as_array().unwrap() {
            text += c["text"].as_str().or(c["delta"]["content"].as_str()).unwrap_or("");
            if let Some(f) = c["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
    }
    (text, finish, done)
}

const PROMPTS: [&str; 16] = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "List three colors:",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Water boils at",
    "In 1492,",
    "A haiku about autumn:",
    "The best way to learn a language is to read, to listen, to speak and to write every day, because",
    "Q: What is 2 + 2?\nA:",
    "Rust is a programming language that",
    "Photosynthesis",
    "My favourite book is",
    "The three laws of robotics are",
    "Hello",
    "To make a cup of tea, first boil the water, then put a tea bag in a cup, pour the water and",
];

#[test]
fn sixteen_concurrent_greedy_requests_get_what_each_gets_alone() {
    let server = Server::start(smollm2(), &["--max-batch", "16"]);
    let body = |i: usize| -> Value {
        let mut b = completion(PROMPTS[i], 12);
        // Two of them sample, each with its own seed: reproducible whatever they run beside.
        if i % 8 == 3 {
            b["temperature"] = json!(0.9);
            b["top_p"] = json!(0.95);
            b["seed"] = json!(1000 + i);
        }
        b
    };
    let steps = server.metric("kiln_engine_steps_total");
    let alone: Vec<String> = (0..16)
        .map(|i| {
            let r = server.post("/v1/completions", &body(i));
            assert_eq!(r.status, 200, "{}", r.body);
            r.json()["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    let alone_steps = server.metric("kiln_engine_steps_total") - steps;
    let server = Arc::new(server);
    let barrier = Arc::new(Barrier::new(16));
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let (server, barrier, body) = (server.clone(), barrier.clone(), body(i));
            std::thread::spawn(move || {
                barrier.wait();
                let r = server.post("/v1/completions", &body);
                assert_eq!(r.status, 200, "{}", r.body);
                r.json()["choices"][0]["text"].as_str().unwrap().to_string()
            })
        })
        .collect();
    let together: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let together_steps = server.metric("kiln_engine_steps_total") - steps - alone_steps;
    for i in 0..16 {
        assert_eq!(together[i], alone[i], "prompt {i} {:?}", PROMPTS[i]);
    }
    // They ran as one batch: far fewer engine steps than one after another.
    assert!(
        together_steps * 2.0 < alone_steps,
        "together {together_steps} steps, alone {alone_steps}"
    );
    // And the greedy ones are what `infer` generates for them alone.
    for i in [0, 4, 9] {
        let out = Command::new(sibling("infer"))
            .args(["--checkpoint", smollm2().to_str().unwrap(), "--prompt", PROMPTS[i]])
            .args(["--max-new-tokens", "12", "--temperature", "0", "--context-full", "stop"])
            .args(["--prefill-chunk", "512"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            stdout.trim_end_matches('\n'),
            format!("{}{}", PROMPTS[i], alone[i]),
            "prompt {i}"
        );
    }
}

#[test]
fn a_client_that_disconnects_mid_stream_leaves_the_batch() {
    let server = Server::start(smollm2(), &[]);
    let mut body = completion("Once upon a time", 2000);
    body["stream"] = json!(true);
    body["ignore_eos"] = json!(true);
    let mut events = server.stream("/v1/completions", &body);
    for _ in 0..3 {
        events.next().expect("a token");
    }
    assert_eq!(server.metric("kiln_running_batch_size"), 1.0);
    drop(events);
    server.wait_for(10, "the sequence leaves the batch", |s| {
        s.metric("kiln_cancelled_total") == 1.0 && s.metric("kiln_running_batch_size") == 0.0
    });
    let generated = server.metric("kiln_generated_tokens_total");
    assert!(
        generated < 200.0,
        "{generated} tokens generated for a client that left after 3"
    );
    // The freed slot serves the next request.
    let r = server.post("/v1/completions", &completion("Hello", 4));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 4);
}

#[test]
fn a_full_queue_answers_429_at_once() {
    let server = Server::start(smollm2(), &["--max-batch", "1", "--max-queue", "1"]);
    let mut body = completion("Once upon a time", 2000);
    body["stream"] = json!(true);
    body["ignore_eos"] = json!(true);
    let mut running = server.stream("/v1/completions", &body);
    running.next().expect("a token");
    let queued = server.send("POST", "/v1/completions", &[], &body.to_string());
    server.wait_for(10, "the second request is queued", |s| {
        s.metric("kiln_queue_depth") == 1.0
    });
    let started = Instant::now();
    let r = server.post("/v1/completions", &completion("Hello", 4));
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert!(r.head.contains("retry-after: 1"), "{}", r.head);
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    assert_eq!(server.metric("kiln_rejected_total"), 1.0);
    drop(running);
    drop(queued);
    server.wait_for(10, "both leave", |s| s.metric("kiln_cancelled_total") == 2.0);
    let r = server.post("/v1/completions", &completion("Hello", 4));
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn errors_name_the_field_and_the_api_key_guards_v1() {
    let server = Server::start(smollm2(), &["--api-key", "sesame", "--max-body-bytes", "65536"]);
    let key = [("Authorization", "Bearer sesame")];
    let call = |body: &str| server.request("POST", "/v1/completions", &key, body);
    // Public: health and metrics.
    assert_eq!(server.get("/health").status, 200);
    assert_eq!(server.get("/metrics").status, 200);
    let r = server.get("/v1/models");
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    let r = server.request("GET", "/v1/models", &[("Authorization", "Bearer wrong")], "");
    assert_eq!(r.status, 401);
    let r = server.request("GET", "/v1/models", &key, "");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["data"][0]["id"], "smollm2");

    let bad = |body: &str, param: Option<&str>, needle: &str| {
        let r = call(body);
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        let e = r.json();
        assert_eq!(e["error"]["param"].as_str(), param, "{body}: {e}");
        assert!(e["error"]["message"].as_str().unwrap().contains(needle), "{body}: {e}");
    };
    bad("{\"prompt\": \"a\",", None, "not valid JSON");
    bad(
        r#"{"prompt": "a", "temperature": "hot"}"#,
        Some("temperature"),
        "invalid type",
    );
    bad(r#"{"prompt": "a", "temperature": 5}"#, Some("temperature"), "[0, 2]");
    bad(r#"{"prompt": "a", "top_p": 2}"#, Some("top_p"), "(0, 1]");
    bad(r#"{"prompt": "a", "top_k": 0}"#, Some("top_k"), "at least 1");
    bad(r#"{"prompt": "a", "n": 0}"#, Some("n"), "at least 1");
    bad(r#"{"prompt": "a", "max_tokens": 0}"#, Some("max_tokens"), "at least 1");
    bad(r#"{"prompt": "a", "logprobs": 50}"#, Some("logprobs"), "at most 20");
    bad(r#"{"prompt": [99999999]}"#, Some("prompt[0]"), "vocabulary");
    bad(r#"{"max_tokens": 3}"#, None, "prompt");
    let long: Vec<u32> = vec![1; 8200];
    bad(&json!({"prompt": long}).to_string(), Some("prompt"), "context is 8192");
    let r = server.request(
        "POST",
        "/v1/chat/completions",
        &key,
        r#"{"messages": [{"role": "user", "content": 5}]}"#,
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "messages[0].content");
    // Too large, wrong model, wrong endpoint for the model, unknown route, wrong method.
    let r = call(&json!({"prompt": "a".repeat(70_000)}).to_string());
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.json()["error"]["type"], "request_too_large");
    let r = call(r#"{"prompt": "a", "model": "gpt-4"}"#);
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["param"], "model");
    let r = server.request("POST", "/v1/embeddings", &key, r#"{"input": "a"}"#);
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("language model")
    );
    let r = server.request("POST", "/v1/nothing", &key, "{}");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["type"], "not_found_error");
    let r = server.request("GET", "/v1/completions", &key, "");
    assert_eq!(r.status, 405);
    assert!(r.json()["error"]["message"].is_string());
    // Still serving after all that, and the statuses were counted.
    let r = call(&completion("Hello", 2).to_string());
    assert_eq!(r.status, 200, "{}", r.body);
    let metrics = server.get("/metrics").body;
    assert!(
        metrics.contains(r#"kiln_requests_total{endpoint="/v1/completions",status="400"}"#),
        "{metrics}"
    );
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

#[test]
fn sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0() {
    let mut server = Server::start(smollm2(), &[]);
    let port = server.port;
    let threads: Vec<_> = (0..2)
        .map(|i| {
            let body = json!({"prompt": PROMPTS[i], "max_tokens": 40, "temperature": 0, "ignore_eos": true});
            let s = Pending(connect(port, Duration::from_secs(120)));
            std::thread::spawn(move || s.finish_post("/v1/completions", &body))
        })
        .collect();
    server.wait_for(20, "both requests run", |s| s.metric("kiln_running_batch_size") == 2.0);
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "still accepting after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for t in threads {
        let r = t.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(v["usage"]["completion_tokens"], 40, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
    }
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}: {}", server.log());
    assert!(server.log().contains("shutting down"), "{}", server.log());
}

/// A connection opened before the signal, sent after.
struct Pending(TcpStream);

impl Pending {
    fn finish_post(mut self, path: &str, body: &Value) -> Response {
        write_request(&mut self.0, "POST", path, &[], &body.to_string());
        read_response(self.0)
    }
}

#[test]
fn a_hundred_streaming_clients_get_every_answer() {
    let server = Arc::new(Server::start(smollm2(), &["--max-batch", "16", "--max-queue", "256"]));
    let threads: Vec<_> = (0..100)
        .map(|c| {
            let server = server.clone();
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                for r in 0..3 {
                    let mut body = completion(PROMPTS[(c + r) % 16], 4);
                    body["stream"] = json!(true);
                    body["ignore_eos"] = json!(true);
                    let (text, finish, done) = read_stream(server.stream("/v1/completions", &body));
                    if !done || finish.as_deref() != Some("length") || text.is_empty() {
                        failures.push(format!("client {c} request {r}: {text:?} {finish:?} done={done}"));
                    }
                }
                failures
            })
        })
        .collect();
    let failures: Vec<String> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let ok = server.metric(r#"kiln_requests_total{endpoint="/v1/completions",status="200"}"#);
    assert_eq!(ok, 300.0);
    assert_eq!(server.metric("kiln_generated_tokens_total"), 1200.0);
}

#[test]
fn embeddings_match_the_encoder_under_concurrent_requests() {
    use kiln_core::layout::WhichWeights;
    use kiln_infer::{LoadedModel, Model};
    let dir = common::minilm_kiln();
    let server = Arc::new(Server::start(&dir, &["--model-name", "minilm"]));
    let texts: Vec<String> = (0..16)
        .map(|i| {
            format!(
                "sentence number {i} about {}",
                ["cats", "the sea", "rust code", "tea"][i % 4]
            )
        })
        .collect();
    let device = burn::prelude::Device::flex();
    let loaded = LoadedModel::open(&dir, WhichWeights::Best, &device).unwrap();
    let Model::Encoder(encoder) = &loaded.model else {
        panic!("MiniLM is an encoder")
    };
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let want = kiln_infer::embed::embed_texts(encoder.as_ref(), loaded.tokenizer.as_ref().unwrap(), &refs, 1, &device)
        .unwrap();
    let barrier = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let (server, barrier) = (server.clone(), barrier.clone());
            let input = vec![texts[2 * i].clone(), texts[2 * i + 1].clone()];
            std::thread::spawn(move || {
                barrier.wait();
                let r = server.post("/v1/embeddings", &json!({"input": input, "model": "minilm"}));
                assert_eq!(r.status, 200, "{}", r.body);
                r.json()
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let v = t.join().unwrap();
        for k in 0..2 {
            let got: Vec<f32> = serde_json::from_value(v["data"][k]["embedding"].clone()).unwrap();
            let diff = got
                .iter()
                .zip(&want[2 * i + k])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(diff <= 1e-5, "text {}: max difference {diff}", 2 * i + k);
        }
        assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 4);
    }
    let texts_run = server.metric("kiln_encoded_texts_total");
    let batches = server.metric("kiln_encoder_batches_total");
    assert_eq!(texts_run, 16.0);
    assert!((1.0..=8.0).contains(&batches), "{batches}");
    let r = server.post("/v1/embeddings", &json!({"input": ["fine", " "]}));
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]["message"].as_str().unwrap().contains("[1] is empty"),
        "{}",
        r.body
    );
    let r = server.post("/v1/classify", &json!({"input": "x"}));
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("classifier"));
    let r = server.post("/v1/completions", &completion("x", 2));
    assert_eq!(r.status, 400);
}

/// The official `openai` package (scripts/setup-openai-client.sh) against both servers:
/// tests/serve_openai.py.
#[test]
fn the_openai_python_package_drives_completions_chat_streaming_and_embeddings() {
    let venv = std::env::var_os("KILN_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("KILN_CACHE").map(|c| PathBuf::from(c).join("venv")))
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/kiln/venv"));
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup-openai-client.sh (scripts/test.sh does)",
        python.display()
    );
    let lm = Server::start(smollm2(), &["--api-key", "sesame", "--max-batch", "8"]);
    let encoder = Server::start(&common::minilm_kiln(), &["--api-key", "sesame"]);
    let out = Command::new(&python)
        .arg(common::repo_root().join("tests/serve_openai.py"))
        .args([
            format!("http://127.0.0.1:{}/v1", lm.port),
            format!("http://127.0.0.1:{}/v1", encoder.port),
        ])
        .args(["--api-key", "sesame"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\nserver: {}",
        String::from_utf8_lossy(&out.stderr),
        lm.log()
    );
    assert!(stdout.contains("all openai client checks passed"), "{stdout}");
}

#[test]
fn a_fine_tuned_classifier_answers_classify_with_its_labels() {
    use kiln_core::layout::WhichWeights;
    use kiln_infer::{LoadedModel, Model};
    // A two-step frozen fine-tune of MiniLM on a slice of Rotten Tomatoes: a real
    // classifier directory with a head and labels.
    let dir = common::scratch_dir("serve-classifier");
    let (train, val, test) = (
        sentiment::slice("train", 32, &dir),
        sentiment::slice("validation", 8, &dir),
        sentiment::slice("test", 8, &dir),
    );
    let config = common::write(
        &dir,
        "frozen.toml",
        &format!(
            "init_from = {:?}\ntask = \"classify\"\nmethod = \"frozen\"\nmax_length = 64\n\n\
             [data]\nkind = \"csv\"\ntrain = {train:?}\nvalidation = {val:?}\ntest = {test:?}\n\
             label_column = \"category\"\ndrop_labels = [\"plot\"]\nempty_text = \"drop\"\n\n\
             [train]\nseed = 3\nbatch_size = 8\nmax_steps = 2\neval_interval = 2\nlog_interval = 1\n\n\
             [optim]\nlr = 1e-3\nwarmup_steps = 1\ndecay_steps = 4\n",
            common::minilm_kiln()
        ),
    );
    let run = dir.join("run");
    let out = Command::new(sibling("finetune"))
        .current_dir(common::repo_root())
        .args([
            "--config",
            config.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let server = Server::start(&run, &[]);
    let texts = ["A warm, funny and wise film.", "Two hours I will never get back."];
    let r = server.post("/v1/classify", &json!({"input": texts}));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let device = burn::prelude::Device::flex();
    let loaded = LoadedModel::open(&run, WhichWeights::Best, &device).unwrap();
    let Model::TextClassifier(model) = &loaded.model else {
        panic!("a classifier")
    };
    let want = kiln_infer::classify::classify_texts(
        model.as_ref(),
        loaded.tokenizer.as_ref().unwrap(),
        &texts,
        64,
        2,
        &device,
    )
    .unwrap();
    for (i, probs) in want.probabilities.iter().enumerate() {
        let got = &v["data"][i];
        let best = kiln_infer::classify::argmax(probs);
        assert_eq!(got["label"], loaded.label(best), "{got}");
        for (k, p) in probs.iter().enumerate() {
            let served = got["probabilities"][loaded.label(k)].as_f64().unwrap();
            assert!((served - *p as f64).abs() < 1e-5, "text {i} class {k}: {served} vs {p}");
        }
    }
    // Embeddings from the classifier's encoder work too; completions do not.
    let r = server.post("/v1/embeddings", &json!({"input": texts[0]}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        server.post("/v1/chat/completions", &json!({"messages": []})).status,
        400
    );
}
