//! Verilog generator: renders the askama templates in `templates/` for one resolved
//! configuration.
//!
//! Every width is computed here and emitted as a number, so the Verilog never depends on
//! `$clog2` of a parameter or on a replication whose count could be zero.

use std::borrow::Borrow;
use std::fmt::Display;
use std::path::Path;

use askama::Template;

use crate::bits::{index_bits, signed_width};
use crate::config::Resolved;
use crate::image::write_atomically;
use crate::recon;

/// Generator version written into every file header.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// One generated source file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeneratedFile {
    /// File name, without directory.
    pub name: String,
    pub text: String,
}

/// One ReCoN switch instance: its stage, index and bit ranges.
#[derive(Clone, Debug)]
pub struct SwitchSite {
    pub stage: usize,
    pub index: usize,
    pub cmd_lo: usize,
    pub lower_lo: usize,
    pub lower_hi: usize,
    pub upper_lo: usize,
    pub upper_hi: usize,
}

/// Numbers and flags the templates read. Signed so that template arithmetic never wraps.
#[derive(Clone, Debug)]
pub struct RtlContext {
    pub version: &'static str,
    pub hash: String,
    pub config_lines: Vec<String>,
    pub rows: i64,
    pub cols: i64,
    pub b: i64,
    pub a: i64,
    pub m: i64,
    pub log_m: i64,
    /// Micro-blocks per row.
    pub ubr: i64,
    pub max_pairs: i64,
    pub stages: i64,
    pub per_stage: i64,
    pub cmd_bits: i64,
    /// Micro-exponent bits.
    pub u: i64,
    /// Outlier offset bits.
    pub x: i64,
    /// Shift register width.
    pub sw: i64,
    /// Exact product width before shifting.
    pub mw: i64,
    pub pw: i64,
    pub lw: i64,
    /// Width of a lane after its shift.
    pub shw: i64,
    pub acc: i64,
    /// Row word width.
    pub rww: i64,
    /// Pair entry width.
    pub pew: i64,
    /// Pair count field width.
    pub pcb: i64,
    pub lo_bits: i64,
    pub hi_bits: i64,
    pub man_bits: i64,
    pub exp_bits: i64,
    /// Largest micro-exponent.
    pub dmax: i64,
    /// Address and counter width.
    pub aw: i64,
    /// Width of a count of flagged micro-blocks in a row.
    pub cw: i64,
    pub meta_bits: i64,
    /// Offset of the micro-exponent inside a micro-block's metadata (after the flag bit).
    pub meta_flag: i64,
    /// Bit where the pair lanes start in a pair entry.
    pub pair_lo: i64,
    /// Bit where the ReCoN commands start in a pair entry.
    pub cmd_lo: i64,
    pub has_shift: bool,
    pub has_pairs: bool,
    /// Fewer rows than all have a ReCoN: passes carry a header that permutes activations.
    pub has_sharing: bool,
    /// PE rows with a ReCoN (all rows without sharing).
    pub recon_rows: i64,
    /// Bits of a PE row index.
    pub rib: i64,
    /// Bits of the swap fields of a header (the header without its first bit).
    pub swap_bits: i64,
    pub has_micro: bool,
    pub outlier_name: String,
    pub switches: Vec<SwitchSite>,
    pub flag_count_expr: String,
    /// Name of the decode module this context renders.
    pub decode_name: String,
    /// Multi-precision PEs (b-bit and 2b-bit layers).
    pub mp: bool,
    /// Width of a PE weight register: b, or b + 1 on a multi-precision array, whose low
    /// lanes hold unsigned halves.
    pub wb: i64,
    /// Width of one weight on the decode-to-array buses: b, or 2b on a multi-precision array.
    pub bus: i64,
    /// The 2b-bit layers' lo_bits: the pre-shift of an outlier's upper half in wide mode.
    pub wide_lo_bits: i64,
    /// The PE needs the mode, because the two kinds of layer pre-shift by different amounts.
    pub pe_mode: bool,
    /// Row word width of each kind of layer, and whether its decode produces shifts.
    pub narrow_rww: i64,
    pub wide_rww: i64,
    pub narrow_shift: bool,
    pub wide_shift: bool,
    /// Bit of the first micro-exponent in a 2b-bit layer's row word.
    pub wide_micro_lo: i64,
    /// Pipeline registers per PE row (0 to 2).
    pub pipeline_stages: i64,
    /// Signal that carries a row's merged lanes to the column shift: the ReCoN output, or its
    /// register with two pipeline stages.
    pub lane_src: String,
    /// Two weight copies per PE (shadow and active).
    pub double_buffered: bool,
    /// The array takes the tile-start pulse: for its shadow registers or the header routing.
    pub array_swap: bool,
}

impl RtlContext {
    /// Builds the context from a resolved configuration.
    pub fn new(r: &Resolved) -> RtlContext {
        let m = r.m;
        let lw = r.lane_width as usize;
        let per_stage = m / 2;
        let mut switches = Vec::new();
        if r.max_pairs > 0 {
            for stage in 0..r.recon_stages {
                let bit = recon::stage_bit(m, stage);
                for index in 0..per_stage {
                    let (lower, upper) = recon::switch_lanes(bit, index);
                    switches.push(SwitchSite {
                        stage,
                        index,
                        cmd_lo: 2 * (stage * per_stage + index),
                        lower_lo: lower * lw,
                        lower_hi: lower * lw + lw - 1,
                        upper_lo: upper * lw,
                        upper_hi: upper * lw + lw - 1,
                    });
                }
            }
        }
        let ubr = r.ublocks_per_row() as i64;
        let cw = index_bits(ubr as u64 + 1) as i64;
        let flag_count_expr = (0..ubr)
            .map(|j| zero_extend(&format!("flags_i[{j}]"), 1, cw))
            .collect::<Vec<_>>()
            .join(" + ");
        // A multi-precision PE's low lane carries an unsigned half of up to 2^b - 1.
        let max_mag = match &r.wide {
            Some(_) => (r.int_format.max_magnitude() as u128).max((1u128 << r.b) - 1),
            None => r.int_format.max_magnitude() as u128,
        };
        let mw = signed_width(max_mag << (r.a - 1)) as i64;
        let (man_bits, exp_bits, outlier_name) = match r.outlier {
            Some(f) if r.max_pairs > 0 => (f.man_bits as i64, f.exp_bits as i64, f.kind.name().to_uppercase()),
            _ => (0, 0, String::new()),
        };
        let pcb = r.pair_count_bits as i64;
        let x = r.offset_bits as i64;
        let log_m = r.log_m as i64;
        let pair_lo = pcb + x;
        let cmd_lo = pair_lo + r.max_pairs as i64 * 2 * log_m;
        RtlContext {
            version: VERSION,
            hash: r.hash.clone(),
            config_lines: r.to_toml().lines().filter(|l| !l.trim().is_empty()).map(String::from).collect(),
            rows: r.rows as i64,
            cols: r.cols as i64,
            b: r.b as i64,
            a: r.a as i64,
            m: m as i64,
            log_m,
            ubr,
            max_pairs: r.max_pairs as i64,
            stages: r.recon_stages as i64,
            per_stage: per_stage as i64,
            cmd_bits: (r.recon_stages * per_stage * 2) as i64,
            u: r.micro_exp_bits as i64,
            x,
            sw: r.shift_bits as i64,
            mw,
            pw: r.product_width as i64,
            lw: lw as i64,
            shw: r.shifted_width as i64,
            acc: r.acc_width as i64,
            rww: r.row_word_bits as i64,
            pew: r.pair_entry_bits as i64,
            pcb,
            lo_bits: r.lo_bits as i64,
            hi_bits: r.hi_bits as i64,
            man_bits,
            exp_bits,
            dmax: r.micro_exp_max() as i64,
            aw: r.config.array.address_bits as i64,
            cw,
            meta_bits: r.ublock_meta_bits as i64,
            meta_flag: i64::from(r.max_pairs > 0),
            pair_lo,
            cmd_lo,
            has_shift: r.max_shift > 0,
            has_pairs: r.max_pairs > 0,
            has_sharing: r.has_sharing,
            recon_rows: if r.max_pairs > 0 { r.recon_rows as i64 } else { 0 },
            rib: index_bits(r.rows as u64) as i64,
            swap_bits: (r.header_bits as i64 - 1).max(0),
            has_micro: r.micro_exp_bits > 0,
            outlier_name,
            switches,
            flag_count_expr,
            decode_name: "msq_decode".to_string(),
            mp: r.wide.is_some(),
            wb: r.b as i64 + i64::from(r.wide.is_some()),
            bus: r.wide.as_ref().map_or(r.b, |w| w.b) as i64,
            wide_lo_bits: r.wide.as_ref().map_or(0, |w| w.lo_bits) as i64,
            pe_mode: r.max_pairs > 0 && r.wide.as_ref().is_some_and(|w| w.lo_bits != r.lo_bits),
            narrow_rww: r.row_word_bits as i64,
            wide_rww: r.wide.as_ref().map_or(0, |w| w.row_word_bits) as i64,
            narrow_shift: r.max_shift > 0,
            wide_shift: r.wide.as_ref().is_some_and(|w| w.max_shift > 0),
            pipeline_stages: r.config.array.pipeline_stages as i64,
            double_buffered: r.config.array.weight_buffer_depth == 2,
            array_swap: r.config.array.weight_buffer_depth == 2 || r.has_sharing,
            lane_src: if r.config.array.pipeline_stages >= 2 { "lane_q" } else { "lane_out" }.to_string(),
            wide_micro_lo: r.wide.as_ref().map_or(0, |w| (r.cols as u32 * w.b + u32::from(w.max_pairs > 0)) as i64),
        }
        .with_design_widths(r)
    }

    /// On a multi-precision array the PE datapath always shifts (high lanes shift by b more),
    /// and the memory words fit both kinds of layer.
    fn with_design_widths(mut self, r: &Resolved) -> RtlContext {
        if let Some(wide) = &r.wide {
            self.has_shift = true;
            self.rww = self.rww.max(wide.row_word_bits as i64);
            assert_eq!(self.pew, wide.pair_entry_bits as i64, "both kinds of layer share the pair entry layout");
        }
        self
    }

    /// Returns the context of one kind of layer's decode module on a multi-precision array:
    /// the layer's own formats, with the design's shift width and file header.
    fn decode_context(&self, layer: &Resolved, name: &str) -> RtlContext {
        let mut ctx = RtlContext::new(layer);
        ctx.decode_name = name.to_string();
        ctx.hash = self.hash.clone();
        ctx.config_lines = self.config_lines.clone();
        ctx.sw = self.sw;
        ctx.rww = layer.row_word_bits as i64;
        ctx.has_shift = layer.max_shift > 0;
        ctx
    }

    /// Zero-extends the `from`-bit expression `expr` to `to` bits.
    pub fn zext(&self, expr: impl Display, from: impl Borrow<i64>, to: impl Borrow<i64>) -> String {
        zero_extend(&expr.to_string(), *from.borrow(), *to.borrow())
    }

    /// Sign-extends the `from`-bit signal `name` (a plain name or a part-select) to `to` bits.
    pub fn sext(&self, name: impl Display, from: impl Borrow<i64>, to: impl Borrow<i64>) -> String {
        let (from, to) = (*from.borrow(), *to.borrow());
        let name = name.to_string();
        assert!(to >= from, "cannot sign-extend {name} from {from} to {to} bits");
        if to == from {
            return name;
        }
        // The sign bit of a part-select `x[a +: w]` is `x[a + w - 1]`.
        let sign = match name.split_once(" +: ") {
            Some((head, _)) => format!("{head} + {}]", from - 1),
            None => format!("{name}[{}]", from - 1),
        };
        format!("{{{{{}{{{sign}}}}}, {name}}}", to - from)
    }
}

fn zero_extend(expr: &str, from: i64, to: i64) -> String {
    assert!(to >= from, "cannot zero-extend {expr} from {from} to {to} bits");
    if to == from {
        expr.to_string()
    } else {
        format!("{{{}'b0, {expr}}}", to - from)
    }
}

/// Parameters of one testbench: memory depths and the layer's counts.
#[derive(Clone, Debug)]
pub struct TestbenchParams {
    pub row_depth: usize,
    pub pair_depth: usize,
    pub pair_entries: usize,
    pub act_depth: usize,
    pub hdr_depth: usize,
    pub hdr_index_bits: u32,
    pub row_index_bits: u32,
    pub pair_index_bits: u32,
    pub act_index_bits: u32,
    pub tiles: usize,
    /// The layer has 2b-bit weights (multi-precision arrays only).
    pub wide: bool,
    pub k_tiles: usize,
    pub vectors: usize,
    pub max_cycles: u64,
    /// Output lines between two progress lines on stdout; 0 prints none.
    pub progress_every: usize,
}

macro_rules! rtl_template {
    ($name:ident, $path:literal) => {
        #[derive(Template)]
        #[template(path = $path, escape = "none")]
        struct $name<'a> {
            ctx: &'a RtlContext,
        }
    };
}

rtl_template!(PeTemplate, "msq_pe.sv");
rtl_template!(SwitchTemplate, "msq_recon_switch.sv");
rtl_template!(ReconTemplate, "msq_recon.sv");
rtl_template!(DecodeTemplate, "msq_decode.sv");
rtl_template!(DecodeMpTemplate, "msq_decode_mp.sv");
rtl_template!(RouteTemplate, "msq_act_route.sv");
rtl_template!(ArrayTemplate, "msq_array.sv");
rtl_template!(CtrlTemplate, "msq_ctrl.sv");
rtl_template!(TopTemplate, "msq_top.sv");

#[derive(Template)]
#[template(path = "msq_tb.sv", escape = "none")]
struct TestbenchTemplate<'a> {
    ctx: &'a RtlContext,
    tb: &'a TestbenchParams,
}

/// One msq_top input driven by the timing wrapper's shift register.
#[derive(Clone, Debug)]
pub struct WrapperPort {
    pub name: String,
    pub lo: usize,
    pub hi: usize,
}

/// Inputs of the timing wrapper.
#[derive(Clone, Debug)]
pub struct WrapperParams {
    pub input_bits: usize,
    pub input_ports: Vec<WrapperPort>,
}

#[derive(Template)]
#[template(path = "msq_fmax_wrap.sv", escape = "none")]
struct WrapperTemplate<'a> {
    ctx: &'a RtlContext,
    tb: &'a WrapperParams,
}

#[derive(Template)]
#[template(path = "msq_fmax_wrap.pcf", escape = "none")]
struct PcfTemplate<'a> {
    version: &'a str,
    hash: &'a str,
}

/// Renders the place-and-route timing wrapper and its iCE40 pin constraints.
pub fn generate_fmax_wrapper(r: &Resolved) -> Vec<GeneratedFile> {
    let ctx = RtlContext::new(r);
    let mut widths: Vec<(&str, i64)> = vec![("start_i", 1), ("tiles_i", ctx.aw), ("k_tiles_i", ctx.aw), ("vectors_i", ctx.aw), ("row_word_i", ctx.rww)];
    if ctx.has_pairs {
        widths.push(("pair_i", ctx.pew));
    }
    if ctx.has_sharing {
        widths.push(("hdr_i", ctx.swap_bits + 1));
    }
    widths.push(("act_i", ctx.rows * ctx.a));
    if ctx.mp {
        widths.push(("wide_i", 1));
    }
    let mut lo = 0usize;
    let mut input_ports = Vec::new();
    for (name, width) in widths {
        let width = width as usize;
        input_ports.push(WrapperPort { name: name.to_string(), lo, hi: lo + width - 1 });
        lo += width;
    }
    let params = WrapperParams { input_bits: lo, input_ports };
    vec![
        render("msq_fmax_wrap.sv", WrapperTemplate { ctx: &ctx, tb: &params }.render()),
        render("msq_fmax_wrap.pcf", PcfTemplate { version: VERSION, hash: &r.hash }.render()),
    ]
}

#[derive(Template)]
#[template(path = "msq_top.xdc", escape = "none")]
struct XdcTemplate<'a> {
    version: &'a str,
    hash: &'a str,
    mhz: String,
    period_ns: String,
}

#[derive(Template)]
#[template(path = "msq_top.sdc", escape = "none")]
struct SdcTemplate<'a> {
    version: &'a str,
    hash: &'a str,
    mhz: String,
    period_ns: String,
}

/// Renders the clock constraints (XDC and SDC) for a clock of `mhz` MHz.
pub fn generate_constraints(r: &Resolved, mhz: f64) -> Vec<GeneratedFile> {
    let mhz_text = format!("{mhz}");
    let period = format!("{:.3}", 1000.0 / mhz);
    vec![
        render(
            "msq_top.xdc",
            XdcTemplate { version: VERSION, hash: &r.hash, mhz: mhz_text.clone(), period_ns: period.clone() }.render(),
        ),
        render("msq_top.sdc", SdcTemplate { version: VERSION, hash: &r.hash, mhz: mhz_text, period_ns: period }.render()),
    ]
}

fn render(name: &str, result: askama::Result<String>) -> GeneratedFile {
    let text = result.unwrap_or_else(|e| panic!("template {name} failed to render: {e}"));
    // Collapse the blank lines that template conditionals leave behind.
    let mut out = String::with_capacity(text.len());
    let mut blank = 0;
    for line in text.lines() {
        if line.trim().is_empty() {
            blank += 1;
            if blank > 1 {
                continue;
            }
        } else {
            blank = 0;
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    GeneratedFile { name: name.to_string(), text: out }
}

/// Renders the design sources for `r`, in compilation order (top level last).
pub fn generate_rtl(r: &Resolved) -> Vec<GeneratedFile> {
    let ctx = RtlContext::new(r);
    let mut files = vec![render("msq_pe.sv", PeTemplate { ctx: &ctx }.render())];
    if ctx.has_pairs {
        files.push(render("msq_recon_switch.sv", SwitchTemplate { ctx: &ctx }.render()));
        files.push(render("msq_recon.sv", ReconTemplate { ctx: &ctx }.render()));
    }
    match &r.wide {
        Some(wide) => {
            let narrow = ctx.decode_context(r, "msq_decode_narrow");
            let wide = ctx.decode_context(wide, "msq_decode_wide");
            files.push(render("msq_decode_narrow.sv", DecodeTemplate { ctx: &narrow }.render()));
            files.push(render("msq_decode_wide.sv", DecodeTemplate { ctx: &wide }.render()));
            files.push(render("msq_decode_mp.sv", DecodeMpTemplate { ctx: &ctx }.render()));
        }
        None => files.push(render("msq_decode.sv", DecodeTemplate { ctx: &ctx }.render())),
    }
    if ctx.has_sharing {
        files.push(render("msq_act_route.sv", RouteTemplate { ctx: &ctx }.render()));
    }
    files.push(render("msq_array.sv", ArrayTemplate { ctx: &ctx }.render()));
    files.push(render("msq_ctrl.sv", CtrlTemplate { ctx: &ctx }.render()));
    files.push(render("msq_top.sv", TopTemplate { ctx: &ctx }.render()));
    files
}

/// Renders the testbench for `r` and one layer.
pub fn generate_testbench(r: &Resolved, tb: &TestbenchParams) -> GeneratedFile {
    let ctx = RtlContext::new(r);
    render("msq_tb.sv", TestbenchTemplate { ctx: &ctx, tb }.render())
}

/// Writes `files` into `dir`, each atomically.
pub fn write_files(dir: &Path, files: &[GeneratedFile]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for file in files {
        write_atomically(&dir.join(&file.name), file.text.as_bytes())?;
    }
    Ok(())
}
