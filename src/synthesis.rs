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
    let stat = std::fs::read_to_string(dir.join("yosys_stat.json"))
        .map_err(|e| SimError(format!("cannot read {}: {e}", dir.join("yosys_stat.json").display())))?;
    // Yosys 0.23 prints its hierarchy summary as bare text lines inside the JSON when the
    // design has a top module, so only lines that can belong to JSON are kept.
    let cleaned: String = stat
        .lines()
        .filter(|line| {
            let t = line.trim_start();
            t.is_empty() || t.starts_with(['"', '{', '}', '[', ']'])
        })
        .map(|line| format!("{line}\n"))
        .collect();
    let json: serde_json::Value = serde_json::from_str(&cleaned)
        .map_err(|e| SimError(format!("invalid yosys stat -json output in {}: {e}", dir.join("yosys_stat.json").display())))?;
    let cells = json["design"]["num_cells"]
        .as_u64()
        .ok_or_else(|| SimError(format!("{} lacks design.num_cells", dir.join("yosys_stat.json").display())))?;
    Ok(SynthesisReport { cells })
}
