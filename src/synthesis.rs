//! Yosys checks of the generated Verilog: elaboration without implicit wires, a generic
//! synthesis, `check -assert`, and no latches.

use std::path::Path;
use std::process::Command;

use crate::generator::GeneratedFile;
use crate::simulation::{find_tool, SimError};

/// Result of a passing Yosys run.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SynthesisReport {
    /// Cells of the flattened design after `synth`.
    pub cells: u64,
}

/// Runs Yosys on the design sources in `dir` and fails on any warning, latch or check error.
///
/// The script reads with `-noautowire`, so an undeclared signal is an error instead of an
/// implicit one-bit wire, and `check -assert` rejects undriven and multiply driven nets.
pub fn check(dir: &Path, files: &[GeneratedFile]) -> Result<SynthesisReport, SimError> {
    let yosys = find_tool("yosys")?;
    let sources: Vec<&str> = files.iter().filter(|f| f.name.ends_with(".sv")).map(|f| f.name.as_str()).collect();
    let script = format!(
        "read_verilog -sv -noautowire {}\n\
         hierarchy -check -top msq_top\n\
         synth -top msq_top\n\
         check -assert\n\
         select -assert-none t:*latch* t:*LATCH*\n\
         tee -q -o yosys_stat.json stat -json -top msq_top\n",
        sources.join(" ")
    );
    std::fs::write(dir.join("check.ys"), script)
        .map_err(|e| SimError(format!("cannot write {}: {e}", dir.join("check.ys").display())))?;
    let out = Command::new(yosys)
        .current_dir(dir)
        .args(["-q", "-l", "yosys.log", "-s", "check.ys"])
        .output()
        .map_err(|e| SimError(format!("failed to start yosys: {e}")))?;
    let log = std::fs::read_to_string(dir.join("yosys.log")).unwrap_or_default();
    if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(SimError(format!(
            "yosys failed ({}); log in {}:\n{}{}",
            out.status,
            dir.join("yosys.log").display(),
            String::from_utf8_lossy(&out.stderr),
            tail.join("\n")
        )));
    }
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("Warning")).collect();
    if !warnings.is_empty() {
        return Err(SimError(format!(
            "yosys printed {} warning(s); log in {}:\n{}",
            warnings.len(),
            dir.join("yosys.log").display(),
            warnings.join("\n")
        )));
    }
    let json = read_stat_json(&dir.join("yosys_stat.json"))?;
    let cells = json["design"]["num_cells"]
        .as_u64()
        .ok_or_else(|| SimError(format!("{} lacks design.num_cells", dir.join("yosys_stat.json").display())))?;
    Ok(SynthesisReport { cells })
}

/// Reads a file written by Yosys `stat -json`.
///
/// Yosys 0.23 prints its hierarchy summary as bare text lines inside the JSON when the design
/// has a top module, so only lines that can belong to JSON are kept.
fn read_stat_json(path: &Path) -> Result<serde_json::Value, SimError> {
    let stat = std::fs::read_to_string(path).map_err(|e| SimError(format!("cannot read {}: {e}", path.display())))?;
    let cleaned: String = stat
        .lines()
        .filter(|line| {
            let t = line.trim_start();
            t.is_empty() || t.starts_with(['"', '{', '}', '[', ']'])
        })
        .map(|line| format!("{line}\n"))
        .collect();
    serde_json::from_str(&cleaned).map_err(|e| SimError(format!("invalid yosys stat -json output in {}: {e}", path.display())))
}

/// Yosys synthesis flow for resource counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// `synth_xilinx` (7-series LUT6, FDCE, CARRY4, DSP48E1).
    Xilinx,
    /// `synth_ice40` (SB_LUT4, SB_DFF*, SB_CARRY, SB_MAC16).
    Ice40,
    /// Generic `synth`: gate-level cells, no LUT mapping.
    Generic,
}

impl Target {
    fn command(self) -> &'static str {
        match self {
            Target::Xilinx => "synth_xilinx -top msq_top",
            Target::Ice40 => "synth_ice40 -noflatten -top msq_top",
            Target::Generic => "synth -top msq_top",
        }
    }
}

/// Resources of one group of modules, summed over every instance.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Resources {
    /// Instances of the group's main module in the design.
    pub instances: u64,
    pub luts: u64,
    pub ffs: u64,
    pub dsps: u64,
    pub brams: u64,
    pub cells: u64,
}

impl Resources {
    fn add(&mut self, other: &Resources) {
        self.luts += other.luts;
        self.ffs += other.ffs;
        self.dsps += other.dsps;
        self.brams += other.brams;
        self.cells += other.cells;
    }
}

/// Resource report of a whole design, per module group.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ResourceReport {
    pub target: Target,
    /// Groups: `pe_array` (PEs, activation skew and column adders), `recon` (ReCoN networks
    /// and their switches), `decode`, `act_routing` (activation swaps for shared ReCoN rows),
    /// `controller`, `top`.
    pub modules: std::collections::BTreeMap<String, Resources>,
    pub total: Resources,
    /// LUTs of ReCoN and decode as a share of all LUTs (0 for the generic target).
    pub recon_decode_lut_share: f64,
}

fn group_of(module: &str) -> &'static str {
    match module {
        "msq_pe" | "msq_array" => "pe_array",
        "msq_recon" | "msq_recon_switch" => "recon",
        "msq_decode" | "msq_decode_mp" | "msq_decode_narrow" | "msq_decode_wide" => "decode",
        "msq_act_route" => "act_routing",
        "msq_ctrl" => "controller",
        _ => "top",
    }
}

/// Cell kinds of the Xilinx and iCE40 libraries and of Yosys' generic gates.
fn classify(cell: &str) -> &'static str {
    let lut = cell.starts_with("LUT") || cell == "SB_LUT4";
    let ff = cell.starts_with("FD") || cell.starts_with("SB_DFF") || cell.starts_with("$_DFF") || cell.starts_with("$_SDFF") || cell.starts_with("$_DFFE");
    let dsp = cell.starts_with("DSP48") || cell == "SB_MAC16";
    let bram = cell.starts_with("RAMB") || cell.starts_with("SB_RAM");
    if lut {
        "lut"
    } else if ff {
        "ff"
    } else if dsp {
        "dsp"
    } else if bram {
        "bram"
    } else {
        "other"
    }
}

/// Synthesizes the design in `dir` with `target` and sums the resources per module group.
pub fn synthesize(dir: &Path, files: &[GeneratedFile], target: Target) -> Result<ResourceReport, SimError> {
    let yosys = find_tool("yosys")?;
    let sources: Vec<&str> = files.iter().filter(|f| f.name.ends_with(".sv")).map(|f| f.name.as_str()).collect();
    let script = format!(
        "read_verilog -sv -noautowire {}\nhierarchy -check -top msq_top\n{}\ntee -q -o resources.json stat -json\n",
        sources.join(" "),
        target.command()
    );
    let script_path = dir.join("resources.ys");
    std::fs::write(&script_path, script).map_err(|e| SimError(format!("cannot write {}: {e}", script_path.display())))?;
    let out = Command::new(yosys)
        .current_dir(dir)
        .args(["-q", "-l", "resources.log", "-s", "resources.ys"])
        .output()
        .map_err(|e| SimError(format!("failed to start yosys: {e}")))?;
    if !out.status.success() {
        return Err(SimError(format!(
            "yosys {} failed ({}); log in {}",
            target.command(),
            out.status,
            dir.join("resources.log").display()
        )));
    }
    let json = read_stat_json(&dir.join("resources.json"))?;
    let modules = json["modules"].as_object().ok_or_else(|| SimError("yosys stat -json has no modules".into()))?;
    let name_of = |key: &str| key.trim_start_matches('\\').to_string();
    let own: std::collections::BTreeMap<String, (Resources, Vec<(String, u64)>)> = modules
        .iter()
        .map(|(key, module)| {
            let mut resources = Resources::default();
            let mut children = Vec::new();
            if let Some(by_type) = module["num_cells_by_type"].as_object() {
                for (cell, count) in by_type {
                    let count = count.as_u64().unwrap_or(0);
                    if modules.contains_key(&format!("\\{cell}")) || modules.contains_key(cell) {
                        children.push((cell.clone(), count));
                        continue;
                    }
                    resources.cells += count;
                    match classify(cell) {
                        "lut" => resources.luts += count,
                        "ff" => resources.ffs += count,
                        "dsp" => resources.dsps += count,
                        "bram" => resources.brams += count,
                        _ => {}
                    }
                }
            }
            (name_of(key), (resources, children))
        })
        .collect();

    // Instance counts from the top down.
    let mut instances: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    fn visit(module: &str, times: u64, own: &std::collections::BTreeMap<String, (Resources, Vec<(String, u64)>)>, instances: &mut std::collections::BTreeMap<String, u64>, depth: usize) {
        *instances.entry(module.to_string()).or_insert(0) += times;
        if depth > 64 {
            return;
        }
        if let Some((_, children)) = own.get(module) {
            for (child, count) in children {
                visit(child, times * count, own, instances, depth + 1);
            }
        }
    }
    visit("msq_top", 1, &own, &mut instances, 0);

    let mut groups: std::collections::BTreeMap<String, Resources> = std::collections::BTreeMap::new();
    let mut total = Resources::default();
    for (module, (resources, _)) in &own {
        let times = instances.get(module).copied().unwrap_or(0);
        let scaled = Resources {
            instances: 0,
            luts: resources.luts * times,
            ffs: resources.ffs * times,
            dsps: resources.dsps * times,
            brams: resources.brams * times,
            cells: resources.cells * times,
        };
        let group = groups.entry(group_of(module).to_string()).or_default();
        group.add(&scaled);
        if matches!(module.as_str(), "msq_pe" | "msq_recon" | "msq_decode" | "msq_decode_mp" | "msq_act_route" | "msq_ctrl" | "msq_top") {
            group.instances = times;
        }
        total.add(&scaled);
    }
    total.instances = 1;
    let recon_decode = groups.get("recon").map_or(0, |g| g.luts) + groups.get("decode").map_or(0, |g| g.luts);
    let share = if total.luts > 0 { recon_decode as f64 / total.luts as f64 } else { 0.0 };
    Ok(ResourceReport { target, modules: groups, total, recon_decode_lut_share: share })
}

/// Result of placing and routing on an iCE40.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PlaceRouteReport {
    pub device: &'static str,
    /// Logic cells used and available.
    pub logic_cells: u64,
    pub logic_cells_available: u64,
    /// Maximum frequency of the internal paths in MHz, from nextpnr's timing analysis.
    pub fmax_mhz: f64,
}

/// Synthesizes the timing wrapper around the design with `synth_ice40` and places and routes
/// it with nextpnr-ice40 on an HX8K (CT256), returning utilisation and the maximum frequency.
pub fn place_and_route_ice40(dir: &Path, files: &[GeneratedFile]) -> Result<PlaceRouteReport, SimError> {
    let yosys = find_tool("yosys")?;
    let nextpnr = which::which("nextpnr-ice40").map_err(|_| {
        SimError("nextpnr-ice40 not found on PATH; install it with `apt-get install nextpnr-ice40 fpga-icestorm`".into())
    })?;
    let sources: Vec<&str> = files.iter().filter(|f| f.name.ends_with(".sv")).map(|f| f.name.as_str()).collect();
    let script = format!(
        "read_verilog -sv -noautowire {}\nhierarchy -check -top msq_fmax_wrap\nsynth_ice40 -top msq_fmax_wrap -json wrap.json\n",
        sources.join(" ")
    );
    std::fs::write(dir.join("ice40.ys"), script).map_err(|e| SimError(format!("cannot write {}: {e}", dir.join("ice40.ys").display())))?;
    let out = Command::new(yosys)
        .current_dir(dir)
        .args(["-q", "-l", "ice40.log", "-s", "ice40.ys"])
        .output()
        .map_err(|e| SimError(format!("failed to start yosys: {e}")))?;
    if !out.status.success() {
        return Err(SimError(format!("yosys synth_ice40 failed ({}); log in {}", out.status, dir.join("ice40.log").display())));
    }
    let out = Command::new(nextpnr)
        .current_dir(dir)
        .args(["--hx8k", "--package", "ct256", "--json", "wrap.json", "--pcf", "msq_fmax_wrap.pcf", "--freq", "12", "--timing-allow-fail", "--seed", "1"])
        .output()
        .map_err(|e| SimError(format!("failed to start nextpnr-ice40: {e}")))?;
    let log = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let _ = std::fs::write(dir.join("nextpnr.log"), &log);
    let cells = log
        .lines()
        .find(|l| l.contains("ICESTORM_LC:"))
        .and_then(|l| l.split("ICESTORM_LC:").nth(1))
        .and_then(|rest| {
            let mut parts = rest.split('/');
            let used = parts.next()?.trim().parse::<u64>().ok()?;
            let available = parts.next()?.split_whitespace().next()?.parse::<u64>().ok()?;
            Some((used, available))
        });
    if !out.status.success() {
        let detail = match cells {
            Some((used, available)) if used > available => format!("the design needs {used} logic cells, the HX8K has {available}"),
            _ => format!("see {}", dir.join("nextpnr.log").display()),
        };
        return Err(SimError(format!("nextpnr-ice40 failed ({}): {detail}", out.status)));
    }
    let (logic_cells, logic_cells_available) =
        cells.ok_or_else(|| SimError(format!("no utilisation in {}", dir.join("nextpnr.log").display())))?;
    // The last "Max frequency" line is the final, post-route analysis.
    let fmax_mhz = log
        .lines()
        .filter(|l| l.contains("Max frequency for clock"))
        .last()
        .and_then(|l| l.split("': ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|mhz| mhz.parse::<f64>().ok())
        .ok_or_else(|| SimError(format!("no maximum frequency in {}", dir.join("nextpnr.log").display())))?;
    Ok(PlaceRouteReport { device: "iCE40 HX8K (CT256)", logic_cells, logic_cells_available, fmax_mhz })
}
