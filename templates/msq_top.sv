{% include "header.sv" %}
// MicroScopiQ accelerator top level: controller, weight decode and PE array with ReCoN.
//
// The memories (row words, {% if ctx.has_pairs %}pair entries, {% endif %}{% if ctx.has_sharing %}pass headers, {% endif %}activation words) sit outside and answer
// each address in the next cycle. Each output is one tile's integer column sums for one
// activation vector; the host scales them by the tile column's exponent and adds the tiles
// along the input channels.
module msq_top (
  input  logic                 clk_i,        // clock
  input  logic                 rst_ni,       // asynchronous reset, active low
  input  logic                 start_i,      // pulse: run one layer
  input  logic [{= ctx.aw - 1 =}:0]   tiles_i,      // passes in the layer (tiles plus extra passes), at least 1
  input  logic [{= ctx.aw - 1 =}:0]   k_tiles_i,    // tiles along the input channels, at least 1
  input  logic [{= ctx.aw - 1 =}:0]   vectors_i,    // activation vectors per tile, at least 1
{% if ctx.mp %}  input  logic                 wide_i,       // sampled with start_i: the layer has {= ctx.bus =}-bit weights
{% endif %}  output logic [{= ctx.aw - 1 =}:0]   row_addr_o,   // row-word memory address
  input  logic [{= ctx.rww - 1 =}:0]   row_word_i,   // row word, one cycle after its address
{% if ctx.has_pairs %}  output logic [{= ctx.aw - 1 =}:0]   pair_addr_o,  // pair-entry memory address
  input  logic [{= ctx.pew - 1 =}:0]   pair_i,       // pair entry, one cycle after its address
{% endif %}{% if ctx.has_sharing %}  output logic [{= ctx.aw - 1 =}:0]   hdr_addr_o,   // pass-header memory address
  input  logic [{= ctx.swap_bits =}:0]   hdr_i,        // pass header, one cycle after its address
{% endif %}  output logic [{= ctx.aw - 1 =}:0]   act_addr_o,   // activation memory address
  input  logic [{= ctx.rows * ctx.a - 1 =}:0]   act_i,        // activation word, one cycle after its address
  output logic                 out_valid_o,  // out_psum_o holds one vector's column sums
  output logic [{= ctx.cols * ctx.acc - 1 =}:0]   out_psum_o,   // column c at [c*{= ctx.acc =} +: {= ctx.acc =}]
  output logic                 done_o        // every output of the layer has been emitted
);

{% if ctx.array_swap %}  logic swap;
{% endif %}  logic act_valid, row_load;
{% if ctx.has_sharing %}  logic hdr_load;
{% endif %}
  logic [{= ctx.rows - 1 =}:0] row_sel;
  logic [{= ctx.cols * ctx.bus - 1 =}:0] inlier_weight;
{% if ctx.has_shift %}  logic [{= ctx.cols * ctx.sw - 1 =}:0] inlier_shift;
{% endif %}{% if ctx.has_pairs %}  logic pair_load;
  logic [{= ctx.ubr - 1 =}:0] flags, ublock_sel;
  logic [{= ctx.cols * ctx.bus - 1 =}:0] row_slots, buf_slots;
{% if ctx.has_micro %}  logic [{= ctx.ubr * ctx.u - 1 =}:0] row_micro, buf_micro;
{% endif %}  logic [{= ctx.m - 1 =}:0] pair_we, pair_hi;
  logic [{= ctx.m * ctx.bus - 1 =}:0] pair_weight;
  logic [{= ctx.m * ctx.sw - 1 =}:0] pair_shift;
  logic [{= ctx.cmd_bits - 1 =}:0] pair_cmd;
{% if !ctx.mp %}
  // Slot and micro-exponent fields of the row word, for the controller's row buffer.
  assign row_slots = row_word_i[{= ctx.cols * ctx.b - 1 =}:0];
{% if ctx.has_micro %}  for (genvar j = 0; j < {= ctx.ubr =}; j++) begin : g_micro
    assign row_micro[j*{= ctx.u =} +: {= ctx.u =}] = row_word_i[{= ctx.cols * ctx.b + ctx.meta_flag =} + j*{= ctx.meta_bits =} +: {= ctx.u =}];
  end
{% endif %}{% endif %}{% endif %}{% if ctx.mp %}
  // The layer's weight width, held for the whole layer.
  logic wide_q;
  always_ff @(posedge clk_i or negedge rst_ni) begin
    if (!rst_ni) begin
      wide_q <= 1'b0;
    end else if (start_i) begin
      wide_q <= wide_i;
    end
  end
{% endif %}
  msq_ctrl u_ctrl (
    .clk_i        (clk_i),
    .rst_ni       (rst_ni),
    .start_i      (start_i),
    .tiles_i      (tiles_i),
    .k_tiles_i    (k_tiles_i),
    .vectors_i    (vectors_i),
{% if ctx.mp %}    .wide_i       (wide_q),
{% endif %}    .row_addr_o   (row_addr_o),
{% if ctx.has_pairs %}    .row_slots_i  (row_slots),
{% if ctx.has_micro %}    .row_micro_i  (row_micro),
{% endif %}    .pair_addr_o  (pair_addr_o),
    .flags_i      (flags),
{% endif %}{% if ctx.has_sharing %}    .hdr_addr_o   (hdr_addr_o),
    .hdr_same_i   (hdr_i[0]),
    .hdr_load_o   (hdr_load),
{% endif %}    .act_addr_o   (act_addr_o),
    .row_load_o   (row_load),
    .row_sel_o    (row_sel),
{% if ctx.has_pairs %}    .pair_load_o  (pair_load),
    .ublock_sel_o (ublock_sel),
    .buf_slots_o  (buf_slots),
{% if ctx.has_micro %}    .buf_micro_o  (buf_micro),
{% endif %}{% endif %}{% if ctx.array_swap %}    .swap_o       (swap),
{% endif %}
    .act_valid_o  (act_valid),
    .out_valid_i  (out_valid_o),
    .done_o       (done_o)
  );

{% if ctx.mp %}  msq_decode_mp u_decode (
    .wide_i          (wide_q),
    .row_word_i      (row_word_i),
{% if ctx.has_pairs %}    .row_slots_o     (row_slots),
{% if ctx.has_micro %}    .row_micro_o     (row_micro),
{% endif %}{% endif %}{% else %}  msq_decode u_decode (
    .row_word_i      (row_word_i),
{% endif %}
    .inlier_weight_o (inlier_weight){% if ctx.has_shift || ctx.has_pairs %},{% endif %}
{% if ctx.has_shift %}    .inlier_shift_o  (inlier_shift){% if ctx.has_pairs %},{% endif %}
{% endif %}{% if ctx.has_pairs %}    .flags_o         (flags),
    .buf_slots_i     (buf_slots),
{% if ctx.has_micro %}    .buf_micro_i     (buf_micro),
{% endif %}    .ublock_sel_i    (ublock_sel),
    .pair_i          (pair_i),
    .pair_we_o       (pair_we),
    .pair_hi_o       (pair_hi),
    .pair_weight_o   (pair_weight),
    .pair_shift_o    (pair_shift),
    .pair_cmd_o      (pair_cmd)
{% endif %}  );

  msq_array u_array (
    .clk_i           (clk_i),
    .rst_ni          (rst_ni),
{% if ctx.array_swap %}    .swap_i          (swap),
{% endif %}
    .act_valid_i     (act_valid),
    .act_i           (act_i),
{% if ctx.mp %}    .wide_i          (wide_q),
{% endif %}{% if ctx.has_sharing %}    .hdr_load_i      (hdr_load),
    .hdr_i           (hdr_i),
{% endif %}    .row_load_i      (row_load),
    .row_sel_i       (row_sel),
    .inlier_weight_i (inlier_weight),
{% if ctx.has_shift %}    .inlier_shift_i  (inlier_shift),
{% endif %}{% if ctx.has_pairs %}    .pair_load_i     (pair_load),
    .ublock_sel_i    (ublock_sel),
    .pair_we_i       (pair_we),
    .pair_hi_i       (pair_hi),
    .pair_weight_i   (pair_weight),
    .pair_shift_i    (pair_shift),
    .pair_cmd_i      (pair_cmd),
{% endif %}    .out_valid_o     (out_valid_o),
    .out_psum_o      (out_psum_o)
  );

endmodule
