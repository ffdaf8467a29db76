{% include "header.sv" %}
// Weight decode, used while a tile loads into the shadow registers.
//
// Inlier part: turns one row word from memory into a two's-complement weight{% if ctx.has_shift %} and a
// shift{% endif %} for each of the {= ctx.cols =} PEs of a row. Slot c is bits [c*{= ctx.b =} +: {= ctx.b =}] (sign-magnitude);
// micro-block j's metadata starts at bit {= ctx.cols * ctx.b =} + j*{= ctx.meta_bits =}{% if ctx.has_pairs %} (bit 0: holds pairs){% endif %}{% if ctx.has_micro %}, and its
// micro-exponent d gives inlier shift {= ctx.dmax =} - d{% endif %}.
{% if ctx.has_pairs %}//
// Pair part: reassembles the {= 2 * ctx.b =}-bit {= ctx.outlier_name =} code of each outlier of the selected
// micro-block from its own slot (upper {= ctx.b =} bits) and its pruned slot (lower {= ctx.b =} bits), and
// returns the significand's upper {= ctx.hi_bits =} bits with the outlier's shift for the outlier lane
// and the lower {= ctx.lo_bits =} bits for the pruned lane. Both lanes get the shift of the merged product. Pair entry layout:
// count [{= ctx.pcb - 1 =}:0], offset code [{= ctx.pcb + ctx.x - 1 =}:{= ctx.pcb =}], pair i lanes o at {= ctx.pair_lo =} + i*{= 2 * ctx.log_m =} and p
// {= ctx.log_m =} bits above it, then the ReCoN commands at bit {= ctx.cmd_lo =}.
{% endif %}module {= ctx.decode_name =} (
  input  logic [{= ctx.rww - 1 =}:0] row_word_i,       // row word read from memory
  output logic [{= ctx.cols * ctx.b - 1 =}:0] inlier_weight_o{% if ctx.has_shift || ctx.has_pairs %},{% endif %}  // weight of PE c at [c*{= ctx.b =} +: {= ctx.b =}]
{% if ctx.has_shift %}  output logic [{= ctx.cols * ctx.sw - 1 =}:0] inlier_shift_o{% if ctx.has_pairs %},{% endif %}   // shift of PE c at [c*{= ctx.sw =} +: {= ctx.sw =}]
{% endif %}{% if ctx.has_pairs %}  output logic [{= ctx.ubr - 1 =}:0] flags_o,          // micro-blocks of the row that hold pairs
  input  logic [{= ctx.cols * ctx.b - 1 =}:0] buf_slots_i,      // slots of the row being completed
{% if ctx.has_micro %}  input  logic [{= ctx.ubr * ctx.u - 1 =}:0] buf_micro_i,      // micro-exponents of that row
{% endif %}  input  logic [{= ctx.ubr - 1 =}:0] ublock_sel_i,     // one-hot micro-block the pair entry belongs to
  input  logic [{= ctx.pew - 1 =}:0] pair_i,           // pair entry read from memory
  output logic [{= ctx.m - 1 =}:0] pair_we_o,        // lanes of the micro-block that the entry writes
  output logic [{= ctx.m - 1 =}:0] pair_hi_o,        // lanes that receive an outlier's upper half
  output logic [{= ctx.m * ctx.b - 1 =}:0] pair_weight_o,    // weight of lane l at [l*{= ctx.b =} +: {= ctx.b =}]
  output logic [{= ctx.m * ctx.sw - 1 =}:0] pair_shift_o,     // shift of lane l at [l*{= ctx.sw =} +: {= ctx.sw =}]
  output logic [{= ctx.cmd_bits - 1 =}:0] pair_cmd_o        // ReCoN commands of the micro-block
{% endif %});

  // Inliers: sign-magnitude to two's complement; the code with sign 1 and magnitude 0 gives 0.
  for (genvar c = 0; c < {= ctx.cols =}; c++) begin : g_inlier
    logic [{= ctx.b - 1 =}:0] code;
    assign code = row_word_i[c*{= ctx.b =} +: {= ctx.b =}];
    assign inlier_weight_o[c*{= ctx.b =} +: {= ctx.b =}] = code[{= ctx.b - 1 =}] ? -{1'b0, code[{= ctx.b - 2 =}:0]} : {1'b0, code[{= ctx.b - 2 =}:0]};
{% if ctx.has_shift %}{% if ctx.has_micro %}    logic [{= ctx.u - 1 =}:0] micro;
    assign micro = row_word_i[{= ctx.cols * ctx.b + ctx.meta_flag =} + (c / {= ctx.m =})*{= ctx.meta_bits =} +: {= ctx.u =}];
    assign inlier_shift_o[c*{= ctx.sw =} +: {= ctx.sw =}] = {= ctx.sw =}'d{= ctx.dmax =} - {= ctx.zext("micro", ctx.u, ctx.sw) =};
{% else %}    // Without micro-exponents every inlier has shift 0.
    assign inlier_shift_o[c*{= ctx.sw =} +: {= ctx.sw =}] = '0;
{% endif %}{% endif %}  end
{% if ctx.has_pairs %}
  for (genvar j = 0; j < {= ctx.ubr =}; j++) begin : g_flag
    assign flags_o[j] = row_word_i[{= ctx.cols * ctx.b =} + j*{= ctx.meta_bits =}];
  end

  // Slots and micro-exponent of the selected micro-block.
  logic [{= ctx.m * ctx.b - 1 =}:0] block_slots;
{% if ctx.has_micro %}  logic [{= ctx.u - 1 =}:0] block_micro;
{% endif %}  always_comb begin
    block_slots = '0;
{% if ctx.has_micro %}    block_micro = '0;
{% endif %}{% for j in 0..ctx.ubr %}    if (ublock_sel_i[{= j =}]) begin
      block_slots = block_slots | buf_slots_i[{= j * ctx.m * ctx.b =} +: {= ctx.m * ctx.b =}];
{% if ctx.has_micro %}      block_micro = block_micro | buf_micro_i[{= j * ctx.u =} +: {= ctx.u =}];
{% endif %}    end
{% endfor %}  end

  logic [{= ctx.pcb - 1 =}:0] count;
  logic [{= ctx.x - 1 =}:0] offset;
  logic [{= ctx.sw - 1 =}:0] base_shift;
  assign count      = pair_i[{= ctx.pcb - 1 =}:0];
  assign offset     = pair_i[{= ctx.pcb + ctx.x - 1 =}:{= ctx.pcb =}];
  assign pair_cmd_o = pair_i[{= ctx.cmd_lo + ctx.cmd_bits - 1 =}:{= ctx.cmd_lo =}];
  // Shift of the outlier's least significant bit before its element exponent is added:
  // micro-exponent distance to the finest grid plus the stored offset.
  assign base_shift = {% if ctx.has_micro %}{= ctx.sw =}'d{= ctx.dmax =} - {= ctx.zext("block_micro", ctx.u, ctx.sw) =} + {% endif %}{= ctx.zext("offset", ctx.x, ctx.sw) =};

  // Per pair: lanes, reassembled code, significand halves and shifts.
  logic [{= ctx.max_pairs - 1 =}:0] pair_valid;
  logic [{= ctx.max_pairs * ctx.log_m - 1 =}:0] pair_o, pair_p;
  logic [{= ctx.max_pairs * ctx.b - 1 =}:0] pair_hi_weight, pair_lo_weight;
  logic [{= ctx.max_pairs * ctx.sw - 1 =}:0] pair_shift;
  for (genvar i = 0; i < {= ctx.max_pairs =}; i++) begin : g_pair
    logic [{= ctx.log_m - 1 =}:0] lane_o, lane_p;
    logic [{= ctx.b - 1 =}:0] slot_o, slot_p;
    logic [{= 2 * ctx.b - 1 =}:0] code;
    logic [{= ctx.exp_bits - 1 =}:0] exponent;
    logic [{= ctx.man_bits =}:0] significand;
    logic [{= ctx.exp_bits - 1 =}:0] exponent_step;  // max(E, 1) - 1
    logic [{= ctx.sw - 1 =}:0] lo_shift;
    assign lane_o = pair_i[{= ctx.pair_lo =} + i*{= 2 * ctx.log_m =} +: {= ctx.log_m =}];
    assign lane_p = pair_i[{= ctx.pair_lo + ctx.log_m =} + i*{= 2 * ctx.log_m =} +: {= ctx.log_m =}];
    assign pair_valid[i] = count > {= ctx.pcb =}'(i);
    assign pair_o[i*{= ctx.log_m =} +: {= ctx.log_m =}] = lane_o;
    assign pair_p[i*{= ctx.log_m =} +: {= ctx.log_m =}] = lane_p;
    assign slot_o = block_slots[lane_o*{= ctx.b =} +: {= ctx.b =}];
    assign slot_p = block_slots[lane_p*{= ctx.b =} +: {= ctx.b =}];
    assign code = {slot_o, slot_p};
    assign exponent = code[{= 2 * ctx.b - 2 =}:{= ctx.man_bits =}];
    assign significand = {exponent != '0, code[{= ctx.man_bits - 1 =}:0]};
    assign exponent_step = (exponent == '0) ? '0 : exponent - 1'b1;
    assign lo_shift = base_shift + {= ctx.zext("exponent_step", ctx.exp_bits, ctx.sw) =};
    assign pair_shift[i*{= ctx.sw =} +: {= ctx.sw =}] = lo_shift;
    assign pair_hi_weight[i*{= ctx.b =} +: {= ctx.b =}] = code[{= 2 * ctx.b - 1 =}]
        ? -{= ctx.zext("significand[" ~ ctx.man_bits ~ ":" ~ ctx.lo_bits ~ "]", ctx.hi_bits, ctx.b) =}
        : {= ctx.zext("significand[" ~ ctx.man_bits ~ ":" ~ ctx.lo_bits ~ "]", ctx.hi_bits, ctx.b) =};
    assign pair_lo_weight[i*{= ctx.b =} +: {= ctx.b =}] = code[{= 2 * ctx.b - 1 =}]
        ? -{= ctx.zext("significand[" ~ (ctx.lo_bits - 1) ~ ":0]", ctx.lo_bits, ctx.b) =}
        : {= ctx.zext("significand[" ~ (ctx.lo_bits - 1) ~ ":0]", ctx.lo_bits, ctx.b) =};
  end

  // Each lane takes the half of the pair that names it; pairs never share a lane.
  always_comb begin
    pair_we_o     = '0;
    pair_hi_o     = '0;
    pair_weight_o = '0;
    pair_shift_o  = '0;
    for (int l = 0; l < {= ctx.m =}; l++) begin
      for (int i = 0; i < {= ctx.max_pairs =}; i++) begin
        if (pair_valid[i] && pair_o[i*{= ctx.log_m =} +: {= ctx.log_m =}] == {= ctx.log_m =}'(l)) begin
          pair_we_o[l] = 1'b1;
          pair_hi_o[l] = 1'b1;
          pair_weight_o[l*{= ctx.b =} +: {= ctx.b =}] = pair_hi_weight[i*{= ctx.b =} +: {= ctx.b =}];
          pair_shift_o[l*{= ctx.sw =} +: {= ctx.sw =}] = pair_shift[i*{= ctx.sw =} +: {= ctx.sw =}];
        end
        if (pair_valid[i] && pair_p[i*{= ctx.log_m =} +: {= ctx.log_m =}] == {= ctx.log_m =}'(l)) begin
          pair_we_o[l] = 1'b1;
          pair_weight_o[l*{= ctx.b =} +: {= ctx.b =}] = pair_lo_weight[i*{= ctx.b =} +: {= ctx.b =}];
          pair_shift_o[l*{= ctx.sw =} +: {= ctx.sw =}] = pair_shift[i*{= ctx.sw =} +: {= ctx.sw =}];
        end
      end
    end
  end
{% endif %}
endmodule
