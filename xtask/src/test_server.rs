//! Part of test step `gpu`: `llama-server` with the device ahead of the RPC GPU.
//!
//! A server is how many Mac users run llama.cpp, and it is where the plugin's shared state meets
//! concurrency: `-np 4` slots decode together and their prompts are prefilled in shared batches.
//! Four concurrent requests must all complete, and one request alone must give the text of the
//! same server without the device. The server is stopped with SIGTERM so that it exits normally
//! and the plugin prints its stats (`ops_offloaded` > 0, no fallback). Plain HTTP/1.1 over
//! loopback, std only.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::test::{self, OMP_WAIT_POLICY};
use crate::test_gpu::{free_port, gpu_args, RpcServer};
use crate::util::{self, bail, Result};
use crate::{demo, llama};

/// A running `llama-server`, killed if still running when dropped.
struct Server {
    child: Child,
    addr: String,
    log: std::path::PathBuf,
}

impl Server {
    fn start(model: &Path, rpc: &RpcServer, plugin: Option<&Path>, name: &str) -> Result<Server> {
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        std::fs::create_dir_all(util::abs("target/xtask-logs"))?;
        let log = util::abs(format!("target/xtask-logs/{name}.log"));
        let mut cmd = Command::new(llama::bin("llama-server"));
        cmd.arg("-m")
            .arg(model)
            .args(gpu_args(&rpc.endpoint, plugin.is_some()))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-np", "4", "-c", "1024", "-t", "2", "--no-warmup"])
            .env("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
            .env_remove("GGML_BACKEND_PATH")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(log.with_extension("stderr"))?);
        if let Some(p) = plugin {
            cmd.env("GGML_BACKEND_PATH", p)
                .env("GGML_ANE_ENGINE", "reference")
                .env("GGML_ANE_STATS", "json")
                .env("GGML_ANE_GPU_SHARE", "0");
        }
        println!("$ {} &", util::render(&cmd));
        let child = cmd.spawn()?;
        let mut s = Server { child, addr, log };
        s.wait_ready(Duration::from_secs(120))?;
        Ok(s)
    }

    /// Waits for `GET /health` to answer 200 (the model is loaded).
    fn wait_ready(&mut self, timeout: Duration) -> Result {
        let start = Instant::now();
        loop {
            if let Ok((200, _)) = http(&self.addr, "GET", "/health", "") {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "llama-server exited ({status}) before it was ready; log {}",
                    self.log.display()
                );
            }
            if start.elapsed() > timeout {
                bail!(
                    "llama-server not ready after {timeout:?}; log {}",
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops the server with SIGTERM (a normal exit: the plugin prints its stats at exit) and
    /// returns its stderr.
    fn stop(mut self) -> Result<String> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let start = Instant::now();
        while self.child.try_wait()?.is_none() {
            if start.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                bail!("llama-server did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(std::fs::read_to_string(self.log.with_extension("stderr")).unwrap_or_default())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request with `Connection: close`: status code and body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> Result<(u32, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    Ok((code, body))
}

/// A JSON string literal's body for `s`.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The string value of the first `"key"` in a JSON text, unescaped (std only: no JSON crate in
/// xtask).
fn json_str_field(json: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\"");
    let rest = json[json.find(&pat)? + pat.len()..].trim_start();
    let rest = rest.strip_prefix(':')?.trim_start().strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?).unwrap_or('?'));
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

/// `POST /completion`, greedy, `n` tokens: the generated text.
fn complete(addr: &str, prompt: &str, n: u32) -> Result<String> {
    let body = format!(
        "{{\"prompt\":{},\"n_predict\":{n},\"temperature\":0,\"top_k\":1,\"cache_prompt\":false}}",
        json_string(prompt)
    );
    let (code, reply) = http(addr, "POST", "/completion", &body)?;
    if code != 200 {
        bail!(
            "POST /completion answered {code}: {}",
            util::tail(&reply, 3)
        );
    }
    json_str_field(&reply, "content")
        .ok_or_else(|| format!("no \"content\" in the reply: {}", util::tail(&reply, 3)).into())
}

/// The server checks (see the module doc); a summary line.
pub(crate) fn check(plugin: &Path, rpc: &RpcServer, model: &Path) -> Result<String> {
    let prompt = demo::PROMPT;
    let alone_gpu = {
        let s = Server::start(model, rpc, None, "gpu-server-rpc")?;
        let t = complete(&s.addr, prompt, 16)?;
        s.stop()?;
        t
    };
    let s = Server::start(model, rpc, Some(plugin), "gpu-server-ane-rpc")?;
    let alone = complete(&s.addr, prompt, 16)?;
    if alone.is_empty() || alone != alone_gpu {
        bail!(
            "llama-server: a request alone beside the device gave {alone:?}, RPC-only {alone_gpu:?}"
        );
    }
    let addr = s.addr.clone();
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let addr = addr.clone();
            // Different prompts, so the four slots prefill different tokens in shared batches.
            let p = format!("{i} {prompt}");
            std::thread::spawn(move || complete(&addr, &p, 16).map_err(|e| e.to_string()))
        })
        .collect();
    let mut done = 0;
    for (i, t) in threads.into_iter().enumerate() {
        match t.join() {
            Ok(Ok(text)) if !text.is_empty() => done += 1,
            Ok(Ok(_)) => bail!("llama-server: concurrent request {i} returned no text"),
            Ok(Err(e)) => bail!("llama-server: concurrent request {i}: {e}"),
            Err(_) => bail!("llama-server: concurrent request {i} panicked"),
        }
    }
    let stderr = s.stop()?;
    let (ops, fallback) = (
        test::stat(&stderr, "ops_offloaded"),
        test::stat(&stderr, "ops_fallback"),
    );
    if ops == 0 || fallback != 0 {
        bail!(
            "llama-server beside the device: ops_offloaded {ops}, ops_fallback {fallback} \
             (want > 0 and 0)\n{}",
            util::tail(&stderr, 10)
        );
    }
    Ok(format!(
        "llama-server -np 4: {done}/4 concurrent requests complete, a request alone = RPC-only \
         text, {ops} matmuls on the device"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_round_trip() {
        let s = "a \"q\" \\ b\nc\u{1}";
        let j = format!("{{\"content\": {}, \"x\": 1}}", json_string(s));
        assert_eq!(json_str_field(&j, "content").as_deref(), Some(s));
        assert_eq!(json_str_field("{\"a\":1}", "content"), None);
        assert_eq!(
            json_str_field("{\"content\":\"\\u00e9t\\u00e9\"}", "content").as_deref(),
            Some("été")
        );
    }
}
