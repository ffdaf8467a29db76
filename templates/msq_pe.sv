{% include "header.sv" %}
// One processing element: a b-bit weight (sign-magnitude in the image, two's complement here)
// times an A-bit two's-complement activation.{% if ctx.has_pairs %} The upper half of an outlier's significand is
// marked by hi and its product is pre-shifted by {= ctx.lo_bits =}, so that ReCoN adds it to the lower half's
// product without a shifter in between.{% endif %}{% if ctx.has_shift %} The PE also holds the shift that its column applies
// after ReCoN.{% endif %}{% if ctx.double_buffered %} The state is double-buffered: load_i writes the shadow copy while the active
// copy computes, and swap_i makes the shadow copy active.{% else %} The state is single-buffered: load_i writes it directly.{% endif %}
module msq_pe (
  input  logic                    clk_i,     // clock
  input  logic                    rst_ni,    // asynchronous reset, active low
  input  logic                    load_i,    // write the inputs into the {% if ctx.double_buffered %}shadow{% else %}active{% endif %} copy
  input  logic signed [{= ctx.wb - 1 =}:0]   weight_i,  // weight, two's complement
{% if ctx.pe_mode %}  input  logic                    wide_i,    // {= ctx.bus =}-bit layer: pre-shift an upper half by {= ctx.wide_lo_bits =}, not {= ctx.lo_bits =}
{% endif %}{% if ctx.has_shift %}  input  logic        [{= ctx.sw - 1 =}:0]   shift_i,   // left shift applied after ReCoN
{% endif %}{% if ctx.has_pairs %}  input  logic                    hi_i,      // the weight is an outlier's upper significand half
{% endif %}{% if ctx.double_buffered %}  input  logic                    swap_i,    // make the shadow copy active
{% endif %}  input  logic signed [{= ctx.a - 1 =}:0]   act_i,     // activation of this PE row
{% if ctx.has_shift %}  output logic        [{= ctx.sw - 1 =}:0]   shift_o,   // active shift{% if ctx.pipeline_stages >= 1 %}, delayed like prod_o{% endif %}
{% endif %}  output logic signed [{= ctx.pw - 1 =}:0]  prod_o     // weight * activation{% if ctx.has_pairs %}, pre-shifted when hi{% endif %}{% if ctx.pipeline_stages >= 1 %}, one cycle later{% endif %}
);

{% if ctx.double_buffered %}  logic signed [{= ctx.wb - 1 =}:0] weight_shadow_q, weight_q;
{% if ctx.has_shift %}  logic        [{= ctx.sw - 1 =}:0] shift_shadow_q, shift_q;
{% endif %}{% if ctx.has_pairs %}  logic hi_shadow_q, hi_q;
{% endif %}
  always_ff @(posedge clk_i or negedge rst_ni) begin
    if (!rst_ni) begin
      weight_shadow_q <= '0;
      weight_q        <= '0;
{% if ctx.has_shift %}      shift_shadow_q  <= '0;
      shift_q         <= '0;
{% endif %}{% if ctx.has_pairs %}      hi_shadow_q     <= 1'b0;
      hi_q            <= 1'b0;
{% endif %}    end else begin
      if (load_i) begin
        weight_shadow_q <= weight_i;
{% if ctx.has_shift %}        shift_shadow_q  <= shift_i;
{% endif %}{% if ctx.has_pairs %}        hi_shadow_q     <= hi_i;
{% endif %}      end
      if (swap_i) begin
        weight_q <= weight_shadow_q;
{% if ctx.has_shift %}        shift_q  <= shift_shadow_q;
{% endif %}{% if ctx.has_pairs %}        hi_q     <= hi_shadow_q;
{% endif %}      end
    end
  end
{% else %}  // Single buffer: the controller loads a tile only after the previous one has passed this row.
  logic signed [{= ctx.wb - 1 =}:0] weight_q;
{% if ctx.has_shift %}  logic        [{= ctx.sw - 1 =}:0] shift_q;
{% endif %}{% if ctx.has_pairs %}  logic hi_q;
{% endif %}
  always_ff @(posedge clk_i or negedge rst_ni) begin
    if (!rst_ni) begin
      weight_q <= '0;
{% if ctx.has_shift %}      shift_q  <= '0;
{% endif %}{% if ctx.has_pairs %}      hi_q     <= 1'b0;
{% endif %}    end else if (load_i) begin
      weight_q <= weight_i;
{% if ctx.has_shift %}      shift_q  <= shift_i;
{% endif %}{% if ctx.has_pairs %}      hi_q     <= hi_i;
{% endif %}    end
  end
{% endif %}
  // Both operands are sign-extended to the exact product width ({= ctx.mw =} bits, derived from
  // the largest magnitudes), so the multiplication is signed and never wraps.
  logic signed [{= ctx.mw - 1 =}:0] weight_ext, act_ext, mul;
  assign weight_ext = {{{= ctx.mw - ctx.wb =}{weight_q[{= ctx.wb - 1 =}]}}, weight_q};
  assign act_ext    = {{{= ctx.mw - ctx.a =}{act_i[{= ctx.a - 1 =}]}}, act_i};
  assign mul        = weight_ext * act_ext;
  logic signed [{= ctx.pw - 1 =}:0] prod;
{% if ctx.has_pairs %}  logic signed [{= ctx.pw - 1 =}:0] mul_ext;
  assign mul_ext = {= ctx.sext("mul", ctx.mw, ctx.pw) =};
{% if ctx.pe_mode %}  assign prod    = !hi_q ? mul_ext : wide_i ? (mul_ext <<< {= ctx.wide_lo_bits =}) : (mul_ext <<< {= ctx.lo_bits =});
{% else %}  assign prod    = hi_q ? (mul_ext <<< {= ctx.lo_bits =}) : mul_ext;
{% endif %}{% else %}  assign prod = {= ctx.sext("mul", ctx.mw, ctx.pw) =};
{% endif %}{% if ctx.pipeline_stages >= 1 %}
  // Product register: the shift is delayed with it, so that both reach ReCoN and the column
  // adder in the same cycle, also across a tile switch.
  logic signed [{= ctx.pw - 1 =}:0] prod_q;
{% if ctx.has_shift %}  logic        [{= ctx.sw - 1 =}:0] shift_stage_q;
{% endif %}  always_ff @(posedge clk_i or negedge rst_ni) begin
    if (!rst_ni) begin
      prod_q        <= '0;
{% if ctx.has_shift %}      shift_stage_q <= '0;
{% endif %}    end else begin
      prod_q        <= prod;
{% if ctx.has_shift %}      shift_stage_q <= shift_q;
{% endif %}    end
  end
  assign prod_o  = prod_q;
{% if ctx.has_shift %}  assign shift_o = shift_stage_q;
{% endif %}{% else %}  assign prod_o  = prod;
{% if ctx.has_shift %}  assign shift_o = shift_q;
{% endif %}{% endif %}
endmodule
