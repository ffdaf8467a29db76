#!/usr/bin/env bash
# Installs the external tools the flow and the tests need (Verilator, Yosys, Icarus Verilog,
# nextpnr-ice40 with the IceStorm database) from Debian packages when they are missing. Needs root for apt-get; otherwise it names the
# packages to install and exits 1.
set -euo pipefail

packages=()
command -v verilator >/dev/null 2>&1 || packages+=(verilator)
command -v yosys >/dev/null 2>&1 || packages+=(yosys)
command -v iverilog >/dev/null 2>&1 || packages+=(iverilog)
command -v nextpnr-ice40 >/dev/null 2>&1 || packages+=(nextpnr-ice40 fpga-icestorm)

if [ ${#packages[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "error: missing ${packages[*]}; install them with: sudo apt-get install ${packages[*]}" >&2
  exit 1
fi

echo "installing ${packages[*]} with apt-get"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
echo "installed: $(verilator --version | head -n 1); $(yosys -V); $(iverilog -V 2>&1 | head -n 1)"
