{% include "header.sv" %}
// One processing element: a b-bit weight (sign-magnitude in the image, two's complement here)
// times an A-bit two's-complement activation{% if ctx.has_shift %}, shifted left by the PE's shift{% endif %}.
// The weight{% if ctx.has_shift %} and shift are{% else %} is{% endif %} double-buffered: load_i writes the shadow copy while the active
// copy computes, and swap_i makes the shadow copy active.
module msq_pe (
  input  logic                    clk_i,     // clock
  input  logic                    rst_ni,    // asynchronous reset, active low
  input  logic                    load_i,    // write the inputs into the shadow copy
  input  logic signed [{= ctx.b - 1 =}:0]   weight_i,  // weight, two's complement
{% if ctx.has_shift %}  input  logic        [{= ctx.sw - 1 =}:0]   shift_i,   // left shift of the product
{% endif %}  input  logic                    swap_i,    // make the shadow copy active
  input  logic signed [{= ctx.a - 1 =}:0]   act_i,     // activation of this PE row
  output logic signed [{= ctx.pw - 1 =}:0]  prod_o     // weight * activation{% if ctx.has_shift %}, shifted{% endif %}
);

  logic signed [{= ctx.b - 1 =}:0] weight_shadow_q, weight_q;
{% if ctx.has_shift %}  logic        [{= ctx.sw - 1 =}:0] shift_shadow_q, shift_q;
{% endif %}
  always_ff @(posedge clk_i or negedge rst_ni) begin
    if (!rst_ni) begin
      weight_shadow_q <= '0;
      weight_q        <= '0;
{% if ctx.has_shift %}      shift_shadow_q  <= '0;
      shift_q         <= '0;
{% endif %}    end else begin
      if (load_i) begin
        weight_shadow_q <= weight_i;
{% if ctx.has_shift %}        shift_shadow_q  <= shift_i;
{% endif %}      end
      if (swap_i) begin
        weight_q <= weight_shadow_q;
{% if ctx.has_shift %}        shift_q  <= shift_shadow_q;
{% endif %}      end
    end
  end

  // Both operands are sign-extended to the exact product width ({= ctx.mw =} bits, derived from
  // the largest magnitudes), so the multiplication is signed and never wraps.
  logic signed [{= ctx.mw - 1 =}:0] weight_ext, act_ext, mul;
  assign weight_ext = {{{= ctx.mw - ctx.b =}{weight_q[{= ctx.b - 1 =}]}}, weight_q};
  assign act_ext    = {{{= ctx.mw - ctx.a =}{act_i[{= ctx.a - 1 =}]}}, act_i};
  assign mul        = weight_ext * act_ext;
{% if ctx.pw > ctx.mw %}
  logic signed [{= ctx.pw - 1 =}:0] mul_ext;
  assign mul_ext = {{{= ctx.pw - ctx.mw =}{mul[{= ctx.mw - 1 =}]}}, mul};
  assign prod_o  = mul_ext <<< shift_q;
{% else if ctx.has_shift %}
  // The shifted product still fits the product width.
  assign prod_o = mul <<< shift_q;
{% else %}
  assign prod_o = mul;
{% endif %}endmodule
