{% include "header.sv" %}
// One 2x2 ReCoN switch. Commands: 0 pass, 1 swap, 2 add into the lower lane and zero the
// upper, 3 add into the upper lane and zero the lower. The lane width covers the sum of an
// outlier's two partial products, so the addition never wraps.
module msq_recon_switch (
  input  logic        [1:0]   cmd_i,    // switch command
  input  logic signed [{= ctx.lw - 1 =}:0]  lower_i,  // lower lane in
  input  logic signed [{= ctx.lw - 1 =}:0]  upper_i,  // upper lane in
  output logic signed [{= ctx.lw - 1 =}:0]  lower_o,  // lower lane out
  output logic signed [{= ctx.lw - 1 =}:0]  upper_o   // upper lane out
);

  logic signed [{= ctx.lw - 1 =}:0] sum;
  assign sum = lower_i + upper_i;

  always_comb begin
    case (cmd_i)
      2'd0: begin
        lower_o = lower_i;
        upper_o = upper_i;
      end
      2'd1: begin
        lower_o = upper_i;
        upper_o = lower_i;
      end
      2'd2: begin
        lower_o = sum;
        upper_o = '0;
      end
      default: begin
        lower_o = '0;
        upper_o = sum;
      end
    endcase
  end

endmodule
