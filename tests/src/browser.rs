//! Headless Chromium (Debian's, driven by selenium through
//! `tests/python/dashboard_browser.py`), one JSON command per line.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// A browser the test drives.
pub struct Browser {
    _child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    pub version: String,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser").field("version", &self.version).finish_non_exhaustive()
    }
}

impl Browser {
    /// Starts Chromium; `Ok(None)` when it cannot start here (the caller skips).
    pub async fn start(screenshots: &Path) -> Result<Option<Self>> {
        let mut child = tokio::process::Command::new("python3")
            .arg(crate::repo_root().join("tests/python/dashboard_browser.py"))
            .arg("--screenshots")
            .arg(screenshots)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Not killed on drop: its stdin closing makes it quit Chromium and end.
            .kill_on_drop(false)
            .spawn()
            .context("python3")?;
        let stdin = child.stdin.take().context("stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let first = tokio::time::timeout(Duration::from_secs(60), stdout.next_line()).await;
        match first {
            Ok(Ok(Some(l))) => {
                let v: Value = serde_json::from_str(&l).with_context(|| l.clone())?;
                let version = v["browser"].as_str().unwrap_or_default().to_string();
                Ok(Some(Self { _child: child, stdin, stdout, version }))
            }
            _ => {
                if let Ok(Some(s)) = child.try_wait()
                    && s.code() == Some(3)
                {
                    return Ok(None);
                }
                if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(5), child.wait()).await
                    && s.code() == Some(3)
                {
                    return Ok(None);
                }
                bail!("the browser driver did not start")
            }
        }
    }

    /// Sends one command and reads its answer.
    pub async fn cmd(&mut self, c: Value) -> Value {
        let line = format!("{c}\n");
        self.stdin.write_all(line.as_bytes()).await.expect("invariant: the driver reads");
        let l = tokio::time::timeout(Duration::from_secs(120), self.stdout.next_line())
            .await
            .expect("the browser driver answers within 2 min")
            .expect("invariant: readable")
            .expect("the browser driver ended");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}"))
    }

    pub async fn open(&mut self, url: &str) -> Value {
        self.cmd(json!({"cmd": "open", "url": url})).await
    }

    /// Waits until `css` matches (holding `text`, when given); the answer has `elapsed`.
    pub async fn wait(&mut self, css: &str, text: Option<&str>, timeout: f64) -> Value {
        let mut c = json!({"cmd": "wait", "css": css, "timeout": timeout});
        if let Some(t) = text {
            c["text"] = json!(t);
        }
        self.cmd(c).await
    }

    /// Like [`Browser::wait`], but the test fails when it does not appear.
    pub async fn expect(&mut self, css: &str, text: Option<&str>, timeout: f64) -> f64 {
        let r = self.wait(css, text, timeout).await;
        assert_eq!(r["ok"], true, "`{css}` with {text:?} within {timeout} s: {r}");
        r["elapsed"].as_f64().unwrap_or_default()
    }

    pub async fn click(&mut self, css: &str) {
        let r = self.cmd(json!({"cmd": "click", "css": css})).await;
        assert_eq!(r["ok"], true, "click {css}: {r}");
    }

    pub async fn texts(&mut self, css: &str) -> Vec<String> {
        let r = self.cmd(json!({"cmd": "text", "css": css})).await;
        r["texts"]
            .as_array()
            .map(|a| a.iter().filter_map(|t| t.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    }

    pub async fn eval(&mut self, js: &str) -> Value {
        self.cmd(json!({"cmd": "eval", "js": js})).await["value"].clone()
    }

    pub async fn screenshot(&mut self, name: &str) {
        let r = self.cmd(json!({"cmd": "screenshot", "name": name})).await;
        assert_eq!(r["ok"], true, "screenshot {name}: {r}");
    }

    /// Console errors and warnings since the last call.
    pub async fn console(&mut self) -> Vec<Value> {
        self.cmd(json!({"cmd": "console"})).await["errors"].as_array().cloned().unwrap_or_default()
    }
}
