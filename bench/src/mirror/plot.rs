//! `--plot FILE.svg`: dirty MiB, copy MiB/s, guest IOPS and guest p99 over the run, one panel
//! each, on a shared time axis, with the job's start and READY marked. Plain SVG, no crate:
//! four polylines and some text.

use std::fmt::Write;

const WIDTH: f64 = 900.0;
const PANEL_HEIGHT: f64 = 150.0;
const MARGIN_LEFT: f64 = 90.0;
const MARGIN_RIGHT: f64 = 20.0;
const GAP: f64 = 30.0;

/// One panel: a title, a unit and points (seconds, value).
pub struct Series {
    pub title: &'static str,
    pub unit: &'static str,
    pub points: Vec<(f64, f64)>,
}

/// Draw `series` over `[0, end_s]`; vertical marks at `marks` (seconds, label).
pub fn svg(series: &[Series], end_s: f64, marks: &[(f64, &str)]) -> String {
    let height = series.len() as f64 * (PANEL_HEIGHT + GAP) + GAP;
    let plot_width = WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
    let x = |t: f64| MARGIN_LEFT + plot_width * (t / end_s.max(1e-9)).clamp(0.0, 1.0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (index, panel) in series.iter().enumerate() {
        let top = GAP + index as f64 * (PANEL_HEIGHT + GAP);
        let max = panel.points.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-9);
        let y = |v: f64| top + PANEL_HEIGHT * (1.0 - v / max);
        let _ = writeln!(
            out,
            r##"<rect x="{MARGIN_LEFT}" y="{top}" width="{plot_width}" height="{PANEL_HEIGHT}" fill="none" stroke="#999"/>"##
        );
        let _ = writeln!(out, r#"<text x="{MARGIN_LEFT}" y="{}">{} ({})</text>"#, top - 6.0, panel.title, panel.unit);
        let _ = writeln!(out, r#"<text x="4" y="{}">{max:.1}</text>"#, top + 12.0);
        let _ = writeln!(out, r#"<text x="4" y="{}">0</text>"#, top + PANEL_HEIGHT);
        let points: Vec<String> = panel.points.iter().map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v))).collect();
        let _ = writeln!(
            out,
            r##"<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{}"/>"##,
            points.join(" ")
        );
        for (at, label) in marks {
            let _ = writeln!(
                out,
                r##"<line x1="{0:.1}" x2="{0:.1}" y1="{top}" y2="{1}" stroke="#d62728" stroke-dasharray="4 3"/>"##,
                x(*at),
                top + PANEL_HEIGHT
            );
            if index == 0 {
                let _ = writeln!(
                    out,
                    r##"<text x="{:.1}" y="{}" fill="#d62728">{label}</text>"##,
                    x(*at) + 3.0,
                    top + 12.0
                );
            }
        }
    }
    let bottom = height - 8.0;
    let _ = writeln!(out, r#"<text x="{MARGIN_LEFT}" y="{bottom}">0 s</text>"#);
    let _ = writeln!(out, r#"<text x="{}" y="{bottom}" text-anchor="end">{end_s:.1} s</text>"#, WIDTH - MARGIN_RIGHT);
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_and_mark_is_drawn() {
        let series = [
            Series { title: "dirty", unit: "MiB", points: vec![(0.0, 10.0), (1.0, 0.0)] },
            Series { title: "guest IOPS", unit: "IOPS", points: vec![(0.0, 2000.0), (1.0, 1900.0)] },
        ];
        let svg = svg(&series, 2.0, &[(0.5, "job"), (1.5, "READY")]);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("READY") && svg.contains("dirty (MiB)") && svg.contains("2000.0"));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }
}
