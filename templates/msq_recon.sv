{% include "header.sv" %}
// ReCoN for one micro-block of {= ctx.m =} lanes: a Benes-style butterfly of {= ctx.stages =} stages of
// 2x2 switches. Stage s exchanges lanes that differ in bit s for s < {= ctx.log_m =}, then the bits
// in reverse order, so the second half can return the values that the first half moved.
// For every outlier pair the commands put the sum of the outlier's two partial products on
// the outlier's lane and zero on the pruned lane; other lanes leave unchanged.
module msq_recon (
  input  logic [{= ctx.cmd_bits - 1 =}:0]  cmd_i,   // 2 bits per switch, stage-major, switch s*{= ctx.per_stage =}+j at bits [2(s*{= ctx.per_stage =}+j) +: 2]
  input  logic [{= ctx.m * ctx.lw - 1 =}:0]  lanes_i, // lane l at bits [l*{= ctx.lw =} +: {= ctx.lw =}], two's complement
  output logic [{= ctx.m * ctx.lw - 1 =}:0]  lanes_o  // merged lanes, same layout
);

  // One named vector per stage boundary: stage_0 is the input, stage_{= ctx.stages =} the output.
{% for s in 0..(ctx.stages + 1) %}  logic [{= ctx.m * ctx.lw - 1 =}:0] stage_{= s =};
{% endfor %}
  assign stage_0 = lanes_i;
{% for sw in ctx.switches %}
  msq_recon_switch u_s{= sw.stage =}_sw{= sw.index =} (
    .cmd_i   (cmd_i[{= sw.cmd_lo + 1 =}:{= sw.cmd_lo =}]),
    .lower_i (stage_{= sw.stage =}[{= sw.lower_hi =}:{= sw.lower_lo =}]),
    .upper_i (stage_{= sw.stage =}[{= sw.upper_hi =}:{= sw.upper_lo =}]),
    .lower_o (stage_{= sw.stage + 1 =}[{= sw.lower_hi =}:{= sw.lower_lo =}]),
    .upper_o (stage_{= sw.stage + 1 =}[{= sw.upper_hi =}:{= sw.upper_lo =}])
  );
{% endfor %}
  assign lanes_o = stage_{= ctx.stages =};

endmodule
