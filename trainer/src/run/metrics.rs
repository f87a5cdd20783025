//! Metrics: one JSON object per line in `metrics.jsonl` (train steps and
//! evaluations), and the loss curve drawn from them as an SVG.

use super::RunError;
use serde_json::Value;
use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct Metrics {
    path: PathBuf,
    file: std::fs::File,
}

fn io(path: &Path, e: std::io::Error) -> RunError {
    RunError::Io(format!("{}: {e}", path.display()))
}

impl Metrics {
    /// Opens `dir/metrics.jsonl`: a resumed run keeps the records of steps
    /// up to its checkpoint's (`keep_until`), as written (parsing and
    /// printing a float again may change its last digit), and rewrites what
    /// followed; a new run starts it empty.
    pub fn open(dir: &Path, keep_until: Option<usize>) -> Result<Metrics, RunError> {
        let path = dir.join("metrics.jsonl");
        let kept: String = records(&path)?
            .into_iter()
            .filter(|(_, r)| keep_until.is_some_and(|k| step_of(r) <= k))
            .map(|(line, _)| line + "\n")
            .collect();
        graft_models::write_atomically(&path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        Ok(Metrics { path, file })
    }

    pub fn log(&mut self, record: Value) -> Result<(), RunError> {
        writeln!(self.file, "{record}").map_err(|e| io(&self.path, e))?;
        self.file.flush().map_err(|e| io(&self.path, e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn step_of(r: &Value) -> usize {
    r.get("step").and_then(Value::as_u64).unwrap_or(0) as usize
}

/// Every record of a metrics file (none if it does not exist).
pub fn read(path: &Path) -> Result<Vec<Value>, RunError> {
    Ok(records(path)?.into_iter().map(|(_, r)| r).collect())
}

/// Every record of a metrics file with its line as written.
fn records(path: &Path) -> Result<Vec<(String, Value)>, RunError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(path, e)),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let r = serde_json::from_str(l)
                .map_err(|e| RunError::Io(format!("{}:{}: {e}", path.display(), i + 1)))?;
            Ok((l.to_string(), r))
        })
        .collect()
}

/// The train and eval loss curves of `records` as an SVG document.
pub fn loss_svg(records: &[Value]) -> String {
    let series = |key: &str| -> Vec<(f64, f64)> {
        records
            .iter()
            .filter_map(|r| Some((step_of(r) as f64, r.get(key)?.as_f64()?)))
            .filter(|(_, y)| y.is_finite())
            .collect()
    };
    let (train, eval) = (series("loss"), series("eval_loss"));
    let all = train.iter().chain(&eval);
    let (x1, y1) = all
        .clone()
        .fold((1.0f64, 0.0f64), |(x, y), p| (x.max(p.0), y.max(p.1)));
    let (w, h, m) = (640.0, 400.0, 50.0);
    let px = |x: f64| m + x / x1 * (w - 2.0 * m);
    let py = |y: f64| h - m - y / y1.max(1e-9) * (h - 2.0 * m);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <line x1=\"{m}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <text x=\"{cx}\" y=\"{ty}\" text-anchor=\"middle\">step (0 to {x1})</text>\n\
         <text x=\"10\" y=\"{m}\">loss (0 to {y1:.3})</text>\n",
        b = h - m,
        r = w - m,
        cx = w / 2.0,
        ty = h - 15.0,
    );
    for (name, pts, color) in [
        ("train", &train, "steelblue"),
        ("eval", &eval, "darkorange"),
    ] {
        if pts.is_empty() {
            continue;
        }
        let path: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"><title>{name} loss</title></polyline>",
            path.join(" ")
        );
        let ly = if name == "train" { 20.0 } else { 36.0 };
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{ly}\" fill=\"{color}\">{name} loss</text>",
            w - 120.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}
