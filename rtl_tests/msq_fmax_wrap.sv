{% include "header.sv" %}
// Timing wrapper for place and route: msq_top has far more ports than an FPGA package has
// pins, so every input comes from a serial shift register and every output folds into one
// registered parity bit. Paths into and out of msq_top then start and end at flip-flops, and
// the reported maximum frequency is that of the design's internal register-to-register paths.
module msq_fmax_wrap (
  input  logic clk_i,     // clock
  input  logic rst_ni,    // asynchronous reset, active low
  input  logic serial_i,  // serial input feeding every msq_top input
  output logic parity_o   // registered parity of every msq_top output
);

  localparam int IN_W = {= tb.input_bits =};

  logic [IN_W-1:0] inputs_q;
  always_ff @(posedge clk_i or negedge rst_ni) begin
    if (!rst_ni) inputs_q <= '0;
    else         inputs_q <= {inputs_q[IN_W-2:0], serial_i};
  end

  logic [{= ctx.aw - 1 =}:0] row_addr, act_addr;
  logic out_valid, done;
  logic [{= ctx.cols * ctx.acc - 1 =}:0] out_psum;
{% if ctx.has_pairs %}  logic [{= ctx.aw - 1 =}:0] pair_addr;
{% endif %}{% if ctx.has_sharing %}  logic [{= ctx.aw - 1 =}:0] hdr_addr;
{% endif %}
  msq_top u_top (
    .clk_i       (clk_i),
    .rst_ni      (rst_ni),
{% for port in tb.input_ports %}    .{= port.name =} (inputs_q[{= port.hi =}:{= port.lo =}]),
{% endfor %}    .row_addr_o  (row_addr),
{% if ctx.has_pairs %}    .pair_addr_o (pair_addr),
{% endif %}{% if ctx.has_sharing %}    .hdr_addr_o  (hdr_addr),
{% endif %}    .act_addr_o  (act_addr),
    .out_valid_o (out_valid),
    .out_psum_o  (out_psum),
    .done_o      (done)
  );

  always_ff @(posedge clk_i or negedge rst_ni) begin
    if (!rst_ni) parity_o <= 1'b0;
    else         parity_o <= ^{row_addr, act_addr, out_valid, done, out_psum{% if ctx.has_pairs %}, pair_addr{% endif %}{% if ctx.has_sharing %}, hdr_addr{% endif %}};
  end

endmodule
