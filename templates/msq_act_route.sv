{% include "header.sv" %}
// Activation routing for shared ReCoN rows. ReCoN row i takes the activation of the row it
// swaps with, and that row takes activation i. A later pass of a tile loads only the ReCoN
// rows, so every other row gets zero activations and its stale weights add nothing. The
// header is double-buffered like the weights and takes effect when the pass's first vector
// enters the array.
module msq_act_route (
  input  logic                 clk_i,       // clock
  input  logic                 rst_ni,      // asynchronous reset, active low
  input  logic                 hdr_load_i,  // hdr_i holds the next pass's header
  input  logic [{= ctx.swap_bits =}:0]   hdr_i,       // bit 0: later pass of a tile; ReCoN row i at [1 + i*{= 1 + ctx.rib =}]: valid, then the row it swaps with
  input  logic                 swap_i,      // act_i is the first vector of the next pass
  input  logic [{= ctx.rows * ctx.a - 1 =}:0]   act_i,       // activation word, element r at [r*{= ctx.a =} +: {= ctx.a =}]
  output logic [{= ctx.rows * ctx.a - 1 =}:0]   act_o        // routed activation word, same layout
);

  logic [{= ctx.swap_bits =}:0] hdr_shadow_q, hdr_q, hdr_now;
  always_ff @(posedge clk_i or negedge rst_ni) begin
    if (!rst_ni) begin
      hdr_shadow_q <= '0;
      hdr_q        <= '0;
    end else begin
      if (hdr_load_i) hdr_shadow_q <= hdr_i;
      if (swap_i)     hdr_q        <= hdr_shadow_q;
    end
  end
  assign hdr_now = swap_i ? hdr_shadow_q : hdr_q;

  always_comb begin
    act_o = act_i;
{% for i in 0..ctx.recon_rows %}    if (hdr_now[{= 1 + i * (1 + ctx.rib) =}]) begin
      for (int e = 0; e < {= ctx.rows =}; e++) begin
        if (hdr_now[{= 2 + i * (1 + ctx.rib) =} +: {= ctx.rib =}] == {= ctx.rib =}'(e)) begin
          act_o[{= i * ctx.a =} +: {= ctx.a =}] = act_i[e*{= ctx.a =} +: {= ctx.a =}];
          act_o[e*{= ctx.a =} +: {= ctx.a =}] = act_i[{= i * ctx.a =} +: {= ctx.a =}];
        end
      end
    end
{% endfor %}    if (hdr_now[0]) begin
      act_o[{= ctx.rows * ctx.a - 1 =}:{= ctx.recon_rows * ctx.a =}] = '0;
    end
  end

endmodule
