//! PNG plots mirroring the paper's figures, drawn with `plotters` into a memory buffer and
//! encoded with `image`. Text uses the bundled DejaVu Sans (no system fonts needed).
//!
//! Each function returns `Ok(None)` when the study has no cells for that plot, and the PNG
//! bytes otherwise; scores are shown ×100.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::io::Cursor;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::prelude::*;

use crate::findings::{Findings, PrimaryMetric};
use crate::results::{Group, Results, Setting, Variant, VariantOrder};

/// V+L, language-only and vision-only scores at one setting.
type Scores = [Option<f64>; 3];

/// Per variant (in report order): values by setting.
type ByVariant<T> = BTreeMap<VariantOrder, (Variant, BTreeMap<Setting, T>)>;

/// Image width.
pub const WIDTH: u32 = 800;
/// Image height (for up to four panels; each further row of two adds 250).
pub const HEIGHT: u32 = 500;
/// At most this many method panels per plot.
pub const MAX_PANELS: usize = 8;

const FONT: &str = "sans-serif";
static FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// A colour-blind-friendly palette (Okabe–Ito, then greys).
const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(120, 120, 120),
    RGBColor(40, 40, 40),
];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

fn err(e: impl Display) -> String {
    e.to_string().replace(['\n', '\r'], " ")
}

fn ensure_font() -> Result<(), String> {
    static LOADED: OnceLock<bool> = OnceLock::new();
    let ok = *LOADED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err("the bundled DejaVu Sans font cannot be parsed".to_string())
    }
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Draws into a white RGB canvas and encodes it as PNG.
fn render(
    width: u32,
    height: u32,
    draw: impl FnOnce(&Area<'_>) -> Result<(), String>,
) -> Result<Vec<u8>, String> {
    ensure_font()?;
    let mut buf = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        draw(&root)?;
        root.present().map_err(err)?;
    }
    let img = image::RgbImage::from_raw(width, height, buf)
        .ok_or_else(|| "canvas has the wrong size".to_string())?;
    let mut png = Vec::new();
    img.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(err)?;
    Ok(png)
}

/// Upper end of the y axis (×100 units) for these values.
fn y_max(values: impl IntoIterator<Item = f64>) -> f64 {
    let m = values
        .into_iter()
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    (m * 100.0 * 1.12).max(1.0)
}

/// Splits the canvas into up to [`MAX_PANELS`] panels, two per row; returns the canvas height.
fn panel_height(n: usize) -> u32 {
    let rows = n.div_ceil(2).max(1) as u32;
    HEIGHT.max(rows * 250)
}

/// How a legend entry is drawn.
#[derive(Clone, Copy)]
enum Key {
    Line,
    Dashed,
    Bar,
}

/// Title, a legend row shared by all panels, then up to [`MAX_PANELS`] panels, two per row.
fn panels<'a>(
    root: &Area<'a>,
    title: &str,
    keys: &[(String, RGBColor, Key)],
    n: usize,
) -> Result<Vec<Area<'a>>, String> {
    let root = root.titled(title, (FONT, 20)).map_err(err)?;
    let (strip, body) = root.split_vertically(26);
    let style = TextStyle::from((FONT, 13).into_font()).color(&BLACK);
    let widths: Vec<i32> = keys
        .iter()
        .map(|(name, _, _)| {
            let w = strip
                .estimate_text_size(name, &style)
                .map_or(60, |(w, _)| w as i32);
            w + 40
        })
        .collect();
    let (width, _) = strip.dim_in_pixel();
    let mut x = (width as i32 - widths.iter().sum::<i32>()).max(0) / 2;
    for ((name, c, key), w) in keys.iter().zip(widths) {
        let y = 12;
        match key {
            Key::Line => strip.draw(&PathElement::new(
                vec![(x, y), (x + 22, y)],
                c.stroke_width(2),
            )),
            Key::Dashed => strip
                .draw(&PathElement::new(
                    vec![(x, y), (x + 8, y)],
                    c.stroke_width(1),
                ))
                .and_then(|()| {
                    strip.draw(&PathElement::new(
                        vec![(x + 13, y), (x + 22, y)],
                        c.stroke_width(1),
                    ))
                }),
            Key::Bar => strip.draw(&Rectangle::new(
                [(x + 4, y - 6), (x + 18, y + 6)],
                c.filled(),
            )),
        }
        .map_err(err)?;
        strip
            .draw(&Text::new(name.clone(), (x + 28, y - 8), style.clone()))
            .map_err(err)?;
        x += w;
    }
    let cols = if n == 1 { 1 } else { 2 };
    let rows = n.div_ceil(cols);
    Ok(body
        .split_evenly((rows, cols))
        .into_iter()
        .take(n)
        .collect())
}

/// Plot 1: score vs vision sparsity at a fixed `s_v + s_l`, one line per sweep (method,
/// pattern, sum), with dense and chance as dashed reference lines.
pub fn split_plot(results: &Results, findings: &Findings) -> Result<Option<Vec<u8>>, String> {
    let Some(metric) = findings.metric else {
        return Ok(None);
    };
    let sweeps: Vec<_> = findings
        .split
        .sweeps
        .iter()
        .filter(|s| !s.points.is_empty())
        .collect();
    if sweeps.is_empty() {
        return Ok(None);
    }
    let dense = metric.of(&results.dense);
    let chance = metric.of(&results.chance);
    let xs = sweeps
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.vision * 100.0));
    let (lo, hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    let (mut x0, mut x1) = ((lo - 5.0).max(0.0), (hi + 5.0).min(100.0));
    if !(x0.is_finite() && x1.is_finite() && x0 < x1) {
        // Only reachable with unvalidated sparsities.
        (x0, x1) = (0.0, 100.0);
    }
    let ymax = y_max(
        sweeps
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.score))
            .chain(dense)
            .chain(chance),
    );
    render(WIDTH, HEIGHT, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!(
                    "Sparsity allocation at a fixed sum s_v + s_l ({})",
                    metric.name()
                ),
                (FONT, 20),
            )
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, 0f64..ymax)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("vision sparsity s_v (%); language s_l = sum − s_v")
            .x_label_formatter(&|x: &f64| format!("{x:.0}"))
            .y_label_formatter(&|y: &f64| format!("{y:.0}"))
            .y_desc(metric.label())
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .draw()
            .map_err(err)?;
        for (i, s) in sweeps.iter().enumerate() {
            let c = color(i);
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .map(|p| (p.vision * 100.0, p.score * 100.0))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                .map_err(err)?
                .label(format!(
                    "{}, {}, sum {}",
                    s.variant.label(),
                    s.pattern,
                    crate::results::percent(s.sum)
                ))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))
                .map_err(err)?;
        }
        reference_lines(&mut chart, x0, x1, dense, chance)?;
        legend(&mut chart, SeriesLabelPosition::UpperLeft)
    })
    .map(Some)
}

type Chart<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

fn reference_lines(
    chart: &mut Chart<'_, '_>,
    x0: f64,
    x1: f64,
    dense: Option<f64>,
    chance: Option<f64>,
) -> Result<(), String> {
    for (name, value, c) in [
        ("dense", dense, BLACK),
        ("chance", chance, RGBColor(150, 150, 150)),
    ] {
        if let Some(v) = value {
            let y = v * 100.0;
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(x0, y), (x1, y)],
                    8,
                    5,
                    c.stroke_width(1),
                ))
                .map_err(err)?
                .label(format!("{name} {:.1}", y))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(1))
                });
        }
    }
    Ok(())
}

fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    pos: SeriesLabelPosition,
) -> Result<(), String> {
    chart
        .configure_series_labels()
        .position(pos)
        .label_font((FONT, 12))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(err)
}

/// Per variant: settings in order, each with the V+L, language-only and vision-only scores.
pub(crate) type TowerRows = Vec<(Variant, Vec<(Setting, Scores)>)>;

/// The tower comparison data: variants that have at least one tower-only cell.
pub(crate) fn tower_rows(results: &Results, metric: PrimaryMetric) -> TowerRows {
    let mut map: ByVariant<Scores> = BTreeMap::new();
    for c in &results.cells {
        let slot = match c.group {
            Group::Grid => 0,
            Group::LanguageOnly => 1,
            Group::VisionOnly => 2,
            Group::Split => continue,
        };
        let (Some(setting), Some(score)) = (c.setting(), metric.of(&c.pruned)) else {
            continue;
        };
        let v = Variant::of(c);
        let entry = map
            .entry(v.sort_key())
            .or_insert_with(|| (v, BTreeMap::new()));
        let row = entry.1.entry(setting).or_insert([None; 3]);
        // The first cell of a kind wins.
        row[slot].get_or_insert(score);
    }
    map.into_values()
        .filter(|(_, rows)| rows.values().any(|r| r[1].is_some() || r[2].is_some()))
        .map(|(v, rows)| (v, rows.into_iter().collect()))
        .collect()
}

/// Per variant: grid settings with the pruned and pruned + RESSA scores (RESSA present).
pub(crate) type RessaRows = Vec<(Variant, Vec<(Setting, f64, f64)>)>;

/// The RESSA comparison data: grid cells with a RESSA score.
pub(crate) fn ressa_rows(results: &Results, metric: PrimaryMetric) -> RessaRows {
    let mut map: ByVariant<(f64, f64)> = BTreeMap::new();
    for c in results.cells.iter().filter(|c| c.group == Group::Grid) {
        let ressa = c.ressa.as_ref().and_then(|r| metric.of(&r.metrics));
        let (Some(setting), Some(pruned), Some(ressa)) = (c.setting(), metric.of(&c.pruned), ressa)
        else {
            continue;
        };
        let v = Variant::of(c);
        map.entry(v.sort_key())
            .or_insert_with(|| (v, BTreeMap::new()))
            .1
            .entry(setting)
            .or_insert((pruned, ressa));
    }
    map.into_values()
        .map(|(v, rows)| (v, rows.into_iter().map(|(s, (p, r))| (s, p, r)).collect()))
        .collect()
}

/// A categorical x axis: category `i` is centred at `i`, the axis spans `-0.5..n-0.5`,
/// and ticks sit on the categories only.
pub(crate) struct Categories(usize);

impl Ranged for Categories {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let t = (value + 0.5) / self.0.max(1) as f64;
        limit.0 + (t * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            (0..self.0).map(|i| i as f64).collect()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        -0.5..self.0 as f64 - 0.5
    }
}

/// A chart with a [`Categories`] x axis labelled `labels`.
fn category_chart<'a, 'b>(
    area: &'a Area<'b>,
    caption: &str,
    labels: &[String],
    ymax: f64,
    y_desc: &str,
) -> Result<
    ChartContext<
        'a,
        BitMapBackend<'b>,
        Cartesian2d<Categories, plotters::coord::types::RangedCoordf64>,
    >,
    String,
> {
    let n = labels.len();
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 15))
        .margin(8)
        .x_label_area_size(26)
        .y_label_area_size(46)
        .build_cartesian_2d(Categories(n), 0f64..ymax)
        .map_err(err)?;
    let fmt = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 {
            labels.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&fmt)
        .y_label_formatter(&|y: &f64| format!("{y:.0}"))
        .y_desc(y_desc)
        .label_style((FONT, 12))
        .axis_desc_style((FONT, 12))
        .draw()
        .map_err(err)?;
    Ok(chart)
}

/// Plot 2: V+L vs language-only vs vision-only across settings, one panel per method.
pub fn towers_plot(
    results: &Results,
    metric: Option<PrimaryMetric>,
) -> Result<Option<Vec<u8>>, String> {
    let Some(metric) = metric else {
        return Ok(None);
    };
    let mut rows = tower_rows(results, metric);
    if rows.is_empty() {
        return Ok(None);
    }
    rows.truncate(MAX_PANELS);
    let dense = metric.of(&results.dense);
    let ymax = y_max(
        rows.iter()
            .flat_map(|(_, r)| r.iter().flat_map(|(_, s)| s.iter().flatten().copied()))
            .chain(dense),
    );
    let groups = [
        ("V+L", RGBColor(213, 94, 0)),
        ("language only", RGBColor(0, 114, 178)),
        ("vision only", RGBColor(0, 158, 115)),
    ];
    let mut keys: Vec<(String, RGBColor, Key)> = groups
        .iter()
        .map(|(name, c)| (name.to_string(), *c, Key::Line))
        .collect();
    if let Some(d) = dense {
        keys.push((format!("dense {:.1}", d * 100.0), BLACK, Key::Dashed));
    }
    render(WIDTH, panel_height(rows.len()), |root| {
        let title = "Which tower to prune: V+L vs language-only vs vision-only";
        let areas = panels(root, title, &keys, rows.len())?;
        for ((variant, settings), area) in rows.iter().zip(&areas) {
            let labels: Vec<String> = settings.iter().map(|(s, _)| s.label()).collect();
            let mut chart = category_chart(area, &variant.label(), &labels, ymax, metric.label())?;
            if let Some(d) = dense {
                let y = d * 100.0;
                chart
                    .draw_series(DashedLineSeries::new(
                        vec![(-0.5, y), (labels.len() as f64 - 0.5, y)],
                        8,
                        5,
                        BLACK.stroke_width(1),
                    ))
                    .map_err(err)?;
            }
            for (g, (_, c)) in groups.iter().enumerate() {
                let c = *c;
                // Lines join neighbouring settings of one kind (unstructured, N:M) only.
                let mut run: Vec<(f64, f64)> = Vec::new();
                let mut runs = Vec::new();
                for (i, (setting, s)) in settings.iter().enumerate() {
                    let joins = i > 0
                        && matches!(
                            (settings[i - 1].0, setting),
                            (Setting::Unstructured(_), Setting::Unstructured(_))
                                | (Setting::NM(..), Setting::NM(..))
                        );
                    if !joins || s[g].is_none() {
                        runs.push(std::mem::take(&mut run));
                    }
                    if let Some(v) = s[g] {
                        run.push((i as f64, v * 100.0));
                    }
                }
                runs.push(run);
                for r in runs.iter().filter(|r| r.len() >= 2) {
                    chart
                        .draw_series(LineSeries::new(r.clone(), c.stroke_width(2)))
                        .map_err(err)?;
                }
                chart
                    .draw_series(
                        runs.iter()
                            .flatten()
                            .map(|&p| Circle::new(p, 3, c.filled())),
                    )
                    .map_err(err)?;
            }
        }
        Ok(())
    })
    .map(Some)
}

/// Plot 3: pruned vs pruned + RESSA bars per grid setting, one panel per method, dense dashed.
pub fn ressa_plot(
    results: &Results,
    metric: Option<PrimaryMetric>,
) -> Result<Option<Vec<u8>>, String> {
    let Some(metric) = metric else {
        return Ok(None);
    };
    let mut rows = ressa_rows(results, metric);
    if rows.is_empty() {
        return Ok(None);
    }
    rows.truncate(MAX_PANELS);
    let dense = metric.of(&results.dense);
    let ymax = y_max(
        rows.iter()
            .flat_map(|(_, r)| r.iter().flat_map(|&(_, p, q)| [p, q]))
            .chain(dense),
    );
    let pruned_c = RGBColor(160, 160, 160);
    let ressa_c = RGBColor(0, 114, 178);
    let mut keys = vec![
        ("pruned".to_string(), pruned_c, Key::Bar),
        ("+ RESSA".to_string(), ressa_c, Key::Bar),
    ];
    if let Some(d) = dense {
        keys.push((format!("dense {:.1}", d * 100.0), BLACK, Key::Dashed));
    }
    render(WIDTH, panel_height(rows.len()), |root| {
        let title = "Pruned vs pruned + RESSA (both towers pruned)";
        let areas = panels(root, title, &keys, rows.len())?;
        for ((variant, settings), area) in rows.iter().zip(&areas) {
            let labels: Vec<String> = settings.iter().map(|(s, _, _)| s.label()).collect();
            let mut chart = category_chart(area, &variant.label(), &labels, ymax, metric.label())?;
            for (slot, c) in [(0, pruned_c), (1, ressa_c)] {
                let bars = settings.iter().enumerate().map(|(i, &(_, p, r))| {
                    let x = i as f64;
                    let (a, b, v) = if slot == 0 {
                        (x - 0.34, x - 0.02, p)
                    } else {
                        (x + 0.02, x + 0.34, r)
                    };
                    Rectangle::new([(a, 0.0), (b, v * 100.0)], c.filled())
                });
                chart.draw_series(bars).map_err(err)?;
            }
            if let Some(d) = dense {
                let y = d * 100.0;
                chart
                    .draw_series(DashedLineSeries::new(
                        vec![(-0.5, y), (labels.len() as f64 - 0.5, y)],
                        8,
                        5,
                        BLACK.stroke_width(1),
                    ))
                    .map_err(err)?;
            }
        }
        Ok(())
    })
    .map(Some)
}
