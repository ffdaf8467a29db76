{% include "header.sv" %}
// Weight decode of a multi-precision array. msq_decode_narrow decodes {= ctx.b =}-bit layers and
// msq_decode_wide decodes {= ctx.bus =}-bit layers; wide_i selects which one drives the array. Weights
// leave as {= ctx.bus =}-bit two's-complement values (narrow ones sign-extended), and the array
// splits a wide weight into its low and high {= ctx.b =}-bit lanes.
module msq_decode_mp (
  input  logic                 wide_i,           // the layer has {= ctx.bus =}-bit weights
  input  logic [{= ctx.rww - 1 =}:0] row_word_i,       // row word read from memory
{% if ctx.has_pairs %}  output logic [{= ctx.cols * ctx.bus - 1 =}:0] row_slots_o,      // slot field of the row word, zero-extended for narrow layers
{% if ctx.has_micro %}  output logic [{= ctx.ubr * ctx.u - 1 =}:0] row_micro_o,      // micro-exponents of the row word
{% endif %}{% endif %}  output logic [{= ctx.cols * ctx.bus - 1 =}:0] inlier_weight_o,  // weight of PE column c at [c*{= ctx.bus =} +: {= ctx.bus =}]
  output logic [{= ctx.cols * ctx.sw - 1 =}:0] inlier_shift_o{% if ctx.has_pairs %},{% endif %}   // shift of PE column c at [c*{= ctx.sw =} +: {= ctx.sw =}]
{% if ctx.has_pairs %}  output logic [{= ctx.ubr - 1 =}:0] flags_o,          // micro-blocks of the row that hold pairs
  input  logic [{= ctx.cols * ctx.bus - 1 =}:0] buf_slots_i,      // slot field of the row being completed
{% if ctx.has_micro %}  input  logic [{= ctx.ubr * ctx.u - 1 =}:0] buf_micro_i,      // micro-exponents of that row
{% endif %}  input  logic [{= ctx.ubr - 1 =}:0] ublock_sel_i,     // one-hot micro-block the pair entry belongs to
  input  logic [{= ctx.pew - 1 =}:0] pair_i,           // pair entry read from memory
  output logic [{= ctx.m - 1 =}:0] pair_we_o,        // lanes of the micro-block that the entry writes
  output logic [{= ctx.m - 1 =}:0] pair_hi_o,        // lanes that receive an outlier's upper half
  output logic [{= ctx.m * ctx.bus - 1 =}:0] pair_weight_o,    // weight of lane l at [l*{= ctx.bus =} +: {= ctx.bus =}]
  output logic [{= ctx.m * ctx.sw - 1 =}:0] pair_shift_o,     // shift of lane l at [l*{= ctx.sw =} +: {= ctx.sw =}]
  output logic [{= ctx.cmd_bits - 1 =}:0] pair_cmd_o        // ReCoN commands of the micro-block
{% endif %});

  logic [{= ctx.cols * ctx.b - 1 =}:0] narrow_weight;
  logic [{= ctx.cols * ctx.bus - 1 =}:0] wide_weight;
{% if ctx.narrow_shift %}  logic [{= ctx.cols * ctx.sw - 1 =}:0] narrow_shift;
{% endif %}{% if ctx.wide_shift %}  logic [{= ctx.cols * ctx.sw - 1 =}:0] wide_shift;
{% endif %}{% if ctx.has_pairs %}  logic [{= ctx.ubr - 1 =}:0] narrow_flags, wide_flags;
  logic [{= ctx.m - 1 =}:0] narrow_we, wide_we, narrow_hi, wide_hi;
  logic [{= ctx.m * ctx.b - 1 =}:0] narrow_pair_weight;
  logic [{= ctx.m * ctx.bus - 1 =}:0] wide_pair_weight;
  logic [{= ctx.m * ctx.sw - 1 =}:0] narrow_pair_shift, wide_pair_shift;
  logic [{= ctx.cmd_bits - 1 =}:0] narrow_cmd, wide_cmd;
{% endif %}
  msq_decode_narrow u_narrow (
    .row_word_i      (row_word_i[{= ctx.narrow_rww - 1 =}:0]),
    .inlier_weight_o (narrow_weight){% if ctx.narrow_shift || ctx.has_pairs %},{% endif %}
{% if ctx.narrow_shift %}    .inlier_shift_o  (narrow_shift){% if ctx.has_pairs %},{% endif %}
{% endif %}{% if ctx.has_pairs %}    .flags_o         (narrow_flags),
    .buf_slots_i     (buf_slots_i[{= ctx.cols * ctx.b - 1 =}:0]),
{% if ctx.has_micro %}    .buf_micro_i     (buf_micro_i),
{% endif %}    .ublock_sel_i    (ublock_sel_i),
    .pair_i          (pair_i),
    .pair_we_o       (narrow_we),
    .pair_hi_o       (narrow_hi),
    .pair_weight_o   (narrow_pair_weight),
    .pair_shift_o    (narrow_pair_shift),
    .pair_cmd_o      (narrow_cmd)
{% endif %}  );

  msq_decode_wide u_wide (
    .row_word_i      (row_word_i[{= ctx.wide_rww - 1 =}:0]),
    .inlier_weight_o (wide_weight){% if ctx.wide_shift || ctx.has_pairs %},{% endif %}
{% if ctx.wide_shift %}    .inlier_shift_o  (wide_shift){% if ctx.has_pairs %},{% endif %}
{% endif %}{% if ctx.has_pairs %}    .flags_o         (wide_flags),
    .buf_slots_i     (buf_slots_i),
{% if ctx.has_micro %}    .buf_micro_i     (buf_micro_i),
{% endif %}    .ublock_sel_i    (ublock_sel_i),
    .pair_i          (pair_i),
    .pair_we_o       (wide_we),
    .pair_hi_o       (wide_hi),
    .pair_weight_o   (wide_pair_weight),
    .pair_shift_o    (wide_pair_shift),
    .pair_cmd_o      (wide_cmd)
{% endif %}  );

  for (genvar c = 0; c < {= ctx.cols =}; c++) begin : g_inlier
    assign inlier_weight_o[c*{= ctx.bus =} +: {= ctx.bus =}] = wide_i ? wide_weight[c*{= ctx.bus =} +: {= ctx.bus =}]
                                                 : {= ctx.sext("narrow_weight[c*" ~ ctx.b ~ " +: " ~ ctx.b ~ "]", ctx.b, ctx.bus) =};
    assign inlier_shift_o[c*{= ctx.sw =} +: {= ctx.sw =}] = wide_i ? {% if ctx.wide_shift %}wide_shift[c*{= ctx.sw =} +: {= ctx.sw =}]{% else %}'0{% endif %}
                                                : {% if ctx.narrow_shift %}narrow_shift[c*{= ctx.sw =} +: {= ctx.sw =}]{% else %}'0{% endif %};
  end
{% if ctx.has_pairs %}
  // The controller buffers the slot field of a row word until its pair entries arrive.
  assign row_slots_o = wide_i ? row_word_i[{= ctx.cols * ctx.bus - 1 =}:0]
                              : {= ctx.zext("row_word_i[" ~ (ctx.cols * ctx.b - 1) ~ ":0]", ctx.cols * ctx.b, ctx.cols * ctx.bus) =};
{% if ctx.has_micro %}  for (genvar j = 0; j < {= ctx.ubr =}; j++) begin : g_micro
    assign row_micro_o[j*{= ctx.u =} +: {= ctx.u =}] = wide_i ? row_word_i[{= ctx.wide_micro_lo =} + j*{= ctx.meta_bits =} +: {= ctx.u =}]
                                             : row_word_i[{= ctx.cols * ctx.b + ctx.meta_flag =} + j*{= ctx.meta_bits =} +: {= ctx.u =}];
  end
{% endif %}
  assign flags_o    = wide_i ? wide_flags : narrow_flags;
  assign pair_we_o  = wide_i ? wide_we : narrow_we;
  assign pair_hi_o  = wide_i ? wide_hi : narrow_hi;
  assign pair_cmd_o = wide_i ? wide_cmd : narrow_cmd;
  assign pair_shift_o = wide_i ? wide_pair_shift : narrow_pair_shift;
  for (genvar l = 0; l < {= ctx.m =}; l++) begin : g_lane
    assign pair_weight_o[l*{= ctx.bus =} +: {= ctx.bus =}] = wide_i ? wide_pair_weight[l*{= ctx.bus =} +: {= ctx.bus =}]
                                                : {= ctx.sext("narrow_pair_weight[l*" ~ ctx.b ~ " +: " ~ ctx.b ~ "]", ctx.b, ctx.bus) =};
  end
{% endif %}
endmodule
