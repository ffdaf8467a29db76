{% include "header.sv" %}
// Weight-stationary PE array of {= ctx.rows =} rows (input channels) by {= ctx.cols =} columns (output channels).
//
// Each row's activation is broadcast to all its PEs, so the products of one row are ready in
// the same cycle and ReCoN can merge them. Row r sees its activation r cycles after row 0, and
// partial sums move down one row per cycle, so a column's sum for one activation vector leaves
// the last row {= ctx.rows + 1 + ctx.pipeline_stages =} cycles after the vector entered{% if ctx.pipeline_stages > 0 %} ({= ctx.pipeline_stages =} of them in pipeline registers){% endif %}. The tile-start pulse follows the same
// skew, so each row switches to the next tile's weights exactly when that tile's first vector
// reaches it.
module msq_array (
  input  logic                 clk_i,            // clock
  input  logic                 rst_ni,           // asynchronous reset, active low
{% if ctx.array_swap %}  input  logic                 swap_i,           // first vector of a new tile{% if ctx.double_buffered %}: make shadow weights active{% endif %}
{% endif %}  input  logic                 act_valid_i,      // act_i holds an activation vector
  input  logic [{= ctx.rows * ctx.a - 1 =}:0]   act_i,            // element r at [r*{= ctx.a =} +: {= ctx.a =}], two's complement
{% if ctx.mp %}  input  logic                 wide_i,           // {= ctx.bus =}-bit layer: rows 2k and 2k+1 hold the halves of input channel k
{% endif %}{% if ctx.has_sharing %}  input  logic                 hdr_load_i,       // hdr_swaps_i holds the next pass's activation swaps
  input  logic [{= ctx.swap_bits =}:0]   hdr_i,            // bit 0: later pass of a tile; ReCoN row i at [1 + i*{= 1 + ctx.rib =}]: valid, then the row it swaps with
{% endif %}
  input  logic                 row_load_i,       // write the inlier decode into row_sel_i's shadow registers
  input  logic [{= ctx.rows - 1 =}:0]   row_sel_i,        // one-hot PE row being loaded
  input  logic [{= ctx.cols * ctx.bus - 1 =}:0]   inlier_weight_i,  // weights of the row, two's complement
{% if ctx.has_shift %}  input  logic [{= ctx.cols * ctx.sw - 1 =}:0]   inlier_shift_i,   // shifts of the row
{% endif %}{% if ctx.has_pairs %}  input  logic                 pair_load_i,      // write the pair decode into one micro-block
  input  logic [{= ctx.ubr - 1 =}:0]   ublock_sel_i,     // one-hot micro-block of that row
  input  logic [{= ctx.m - 1 =}:0]   pair_we_i,        // lanes written by the pair decode
  input  logic [{= ctx.m - 1 =}:0]   pair_hi_i,        // lanes that receive an outlier's upper half
  input  logic [{= ctx.m * ctx.bus - 1 =}:0]   pair_weight_i,    // lane weights, two's complement
  input  logic [{= ctx.m * ctx.sw - 1 =}:0]   pair_shift_i,     // lane shifts
  input  logic [{= ctx.cmd_bits - 1 =}:0]   pair_cmd_i,       // ReCoN commands of the micro-block
{% endif %}  output logic                 out_valid_o,      // out_psum_o holds one vector's column sums
  output logic [{= ctx.cols * ctx.acc - 1 =}:0]   out_psum_o        // column c at [c*{= ctx.acc =} +: {= ctx.acc =}], two's complement
);

  // Partial sums of every row, row r at [r*{= ctx.cols * ctx.acc =} +: {= ctx.cols * ctx.acc =}].
  logic [{= ctx.rows * ctx.cols * ctx.acc - 1 =}:0] psum_q;
  // Tile-start pulse as each row sees it, and the valid flag of each row's activation register.
{% if ctx.double_buffered %}  logic [{= ctx.rows - 1 =}:0] swap_row;
{% endif %}  logic [{= ctx.rows - 1 =}:0] valid_row_q;

  logic [{= ctx.rows * ctx.a - 1 =}:0] act_routed;
{% if ctx.has_sharing %}
  msq_act_route u_route (
    .clk_i      (clk_i),
    .rst_ni     (rst_ni),
    .hdr_load_i (hdr_load_i),
    .hdr_i      (hdr_i),
    .swap_i     (swap_i),
    .act_i      (act_i),
    .act_o      (act_routed)
  );
{% else if ctx.mp %}
  // In a {= ctx.bus =}-bit layer, rows 2k and 2k+1 hold the two halves of input channel k's weights
  // and both see activation element k.
  for (genvar r = 0; r < {= ctx.rows =}; r++) begin : g_act_mode
    assign act_routed[r*{= ctx.a =} +: {= ctx.a =}] = wide_i ? act_i[(r/2)*{= ctx.a =} +: {= ctx.a =}] : act_i[r*{= ctx.a =} +: {= ctx.a =}];
  end
{% else %}
  // Every row holds its own input channel.
  assign act_routed = act_i;
{% endif %}
  for (genvar r = 0; r < {= ctx.rows =}; r++) begin : g_row
    logic signed [{= ctx.a - 1 =}:0] act_q;

    if (r == 0) begin : g_first
{% if ctx.double_buffered %}      assign swap_row[0] = swap_i;
{% endif %}      always_ff @(posedge clk_i or negedge rst_ni) begin
        if (!rst_ni) begin
          act_q          <= '0;
          valid_row_q[0] <= 1'b0;
        end else begin
          act_q          <= act_routed[{= ctx.a - 1 =}:0];
          valid_row_q[0] <= act_valid_i;
        end
      end
    end else begin : g_skewed
      // r delay registers in front of act_q give row r its r-cycle skew; the newest element
      // enters at the bottom.
      logic [r*{= ctx.a =}-1:0] delay_q;
{% if ctx.double_buffered %}      logic swap_q;
      assign swap_row[r] = swap_q;
{% endif %}      if (r == 1) begin : g_one
        always_ff @(posedge clk_i or negedge rst_ni) begin
          if (!rst_ni) delay_q <= '0;
          else         delay_q <= act_routed[r*{= ctx.a =} +: {= ctx.a =}];
        end
      end else begin : g_chain
        always_ff @(posedge clk_i or negedge rst_ni) begin
          if (!rst_ni) delay_q <= '0;
          else         delay_q <= {delay_q[(r-1)*{= ctx.a =}-1:0], act_routed[r*{= ctx.a =} +: {= ctx.a =}]};
        end
      end
      always_ff @(posedge clk_i or negedge rst_ni) begin
        if (!rst_ni) begin
          act_q          <= '0;
{% if ctx.double_buffered %}          swap_q         <= 1'b0;
{% endif %}          valid_row_q[r] <= 1'b0;
        end else begin
          act_q          <= delay_q[r*{= ctx.a =}-1 -: {= ctx.a =}];
{% if ctx.double_buffered %}          swap_q         <= swap_row[r-1];
{% endif %}          valid_row_q[r] <= valid_row_q[r-1];
        end
      end
    end

    // Products of the row, and the lanes that reach the column adders.
    logic [{= ctx.cols * ctx.lw - 1 =}:0] lane_in;
    logic [{= ctx.cols * ctx.lw - 1 =}:0] lane_out;
{% if ctx.pipeline_stages >= 2 %}    // Register after ReCoN: cuts the path between the last switch stage and the column shift.
    logic [{= ctx.cols * ctx.lw - 1 =}:0] lane_q;
    always_ff @(posedge clk_i or negedge rst_ni) begin
      if (!rst_ni) lane_q <= '0;
      else         lane_q <= lane_out;
    end
{% endif %}    for (genvar c = 0; c < {= ctx.cols =}; c++) begin : g_col
      logic load;
      logic signed [{= ctx.wb - 1 =}:0] weight;
{% if ctx.mp %}      logic [{= ctx.bus - 1 =}:0] bus_weight;
      logic [{= ctx.sw - 1 =}:0] bus_shift;
{% endif %}
{% if ctx.has_shift %}      logic [{= ctx.sw - 1 =}:0] shift;
{% endif %}      logic signed [{= ctx.pw - 1 =}:0] prod;
{% if ctx.has_shift %}      logic [{= ctx.sw - 1 =}:0] active_shift;
{% endif %}{% if ctx.has_pairs %}      logic hi;
      assign load   = row_sel_i[r] && (row_load_i || (pair_load_i && ublock_sel_i[c / {= ctx.m =}] && pair_we_i[c % {= ctx.m =}]));
      assign hi     = !row_load_i && pair_hi_i[c % {= ctx.m =}];
      assign {% if ctx.mp %}bus_weight{% else %}weight{% endif %} = row_load_i ? inlier_weight_i[c*{= ctx.bus =} +: {= ctx.bus =}] : pair_weight_i[(c % {= ctx.m =})*{= ctx.bus =} +: {= ctx.bus =}];
      assign {% if ctx.mp %}bus_shift{% else %}shift{% endif %}  = row_load_i ? inlier_shift_i[c*{= ctx.sw =} +: {= ctx.sw =}] : pair_shift_i[(c % {= ctx.m =})*{= ctx.sw =} +: {= ctx.sw =}];
{% else %}
      assign load   = row_sel_i[r] && row_load_i;
      assign {% if ctx.mp %}bus_weight{% else %}weight{% endif %} = inlier_weight_i[c*{= ctx.bus =} +: {= ctx.bus =}];
{% if ctx.has_shift %}      assign {% if ctx.mp %}bus_shift{% else %}shift{% endif %}  = inlier_shift_i[c*{= ctx.sw =} +: {= ctx.sw =}];
{% endif %}{% endif %}{% if ctx.mp %}      // A narrow weight arrives sign-extended, so its low {= ctx.wb =} bits hold it. A wide weight w
      // splits into w = high * 2^{= ctx.b =} + low with an unsigned low half, and the high lane's
      // column shift grows by {= ctx.b =}.
      if ((r % 2) == 0) begin : g_low_lane
        // The bus's top bit, the sign of a wide weight's high half, only matters in odd rows.
        logic unused_high_sign;
        assign unused_high_sign = bus_weight[{= ctx.bus - 1 =}];
        assign weight = wide_i ? {1'b0, bus_weight[{= ctx.b - 1 =}:0]} : bus_weight[{= ctx.b =}:0];
        assign shift  = bus_shift;
      end else begin : g_high_lane
        assign weight = wide_i ? {bus_weight[{= ctx.bus - 1 =}], bus_weight[{= ctx.bus - 1 =}:{= ctx.b =}]} : bus_weight[{= ctx.b =}:0];
        assign shift  = wide_i ? bus_shift + {= ctx.sw =}'d{= ctx.b =} : bus_shift;
      end
{% endif %}
      msq_pe u_pe (
        .clk_i    (clk_i),
        .rst_ni   (rst_ni),
        .load_i   (load),
        .weight_i (weight),
{% if ctx.pe_mode %}        .wide_i   (wide_i),
{% endif %}
{% if ctx.has_shift %}        .shift_i  (shift),
{% endif %}{% if ctx.has_pairs %}        .hi_i     (hi),
{% endif %}{% if ctx.double_buffered %}        .swap_i   (swap_row[r]),
{% endif %}
        .act_i    (act_q),
{% if ctx.has_shift %}        .shift_o  (active_shift),
{% endif %}        .prod_o   (prod)
      );
      assign lane_in[c*{= ctx.lw =} +: {= ctx.lw =}] = {= ctx.sext("prod", ctx.pw, ctx.lw) =};

      // Column adder: the partial sum from the row above plus this row's merged product,
      // shifted by the PE's shift after ReCoN.
      logic signed [{= ctx.shw - 1 =}:0] shifted;
      logic signed [{= ctx.acc - 1 =}:0] addend;
{% if ctx.pipeline_stages >= 2 && ctx.has_shift %}      // The shift follows its lane through the register after ReCoN.
      logic [{= ctx.sw - 1 =}:0] lane_shift_q;
      always_ff @(posedge clk_i or negedge rst_ni) begin
        if (!rst_ni) lane_shift_q <= '0;
        else         lane_shift_q <= active_shift;
      end
{% endif %}{% if ctx.has_shift %}      logic signed [{= ctx.shw - 1 =}:0] lane_ext;
      assign lane_ext = {= ctx.sext(ctx.lane_src ~ "[c*" ~ ctx.lw ~ " +: " ~ ctx.lw ~ "]", ctx.lw, ctx.shw) =};
      assign shifted  = lane_ext <<< {% if ctx.pipeline_stages >= 2 %}lane_shift_q{% else %}active_shift{% endif %};
{% else %}      assign shifted  = {= ctx.sext(ctx.lane_src ~ "[c*" ~ ctx.lw ~ " +: " ~ ctx.lw ~ "]", ctx.lw, ctx.shw) =};
{% endif %}      assign addend   = {= ctx.sext("shifted", ctx.shw, ctx.acc) =};
      if (r == 0) begin : g_top
        always_ff @(posedge clk_i or negedge rst_ni) begin
          if (!rst_ni) psum_q[c*{= ctx.acc =} +: {= ctx.acc =}] <= '0;
          else         psum_q[c*{= ctx.acc =} +: {= ctx.acc =}] <= addend;
        end
      end else begin : g_below
        always_ff @(posedge clk_i or negedge rst_ni) begin
          if (!rst_ni) psum_q[(r*{= ctx.cols =}+c)*{= ctx.acc =} +: {= ctx.acc =}] <= '0;
          else         psum_q[(r*{= ctx.cols =}+c)*{= ctx.acc =} +: {= ctx.acc =}] <=
                           psum_q[((r-1)*{= ctx.cols =}+c)*{= ctx.acc =} +: {= ctx.acc =}] + addend;
        end
      end
    end
{% if ctx.has_pairs %}
    if (r < {= ctx.recon_rows =}) begin : g_recon_row
{% if ctx.double_buffered %}    // One ReCoN per micro-block, with double-buffered commands like the weights.
    for (genvar j = 0; j < {= ctx.ubr =}; j++) begin : g_recon
      logic [{= ctx.cmd_bits - 1 =}:0] cmd_shadow_q, cmd_q;
      always_ff @(posedge clk_i or negedge rst_ni) begin
        if (!rst_ni) begin
          cmd_shadow_q <= '0;
          cmd_q        <= '0;
        end else begin
          // A new row starts with every switch passing; its pair entries then set the commands.
          if (row_sel_i[r] && row_load_i) begin
            cmd_shadow_q <= '0;
          end else if (row_sel_i[r] && pair_load_i && ublock_sel_i[j]) begin
            cmd_shadow_q <= pair_cmd_i;
          end
          if (swap_row[r]) begin
            cmd_q <= cmd_shadow_q;
          end
        end
      end
{% else %}    // One ReCoN per micro-block, with single-buffered commands like the weights.
    for (genvar j = 0; j < {= ctx.ubr =}; j++) begin : g_recon
      logic [{= ctx.cmd_bits - 1 =}:0] cmd_q;
      always_ff @(posedge clk_i or negedge rst_ni) begin
        if (!rst_ni) begin
          cmd_q <= '0;
        end else if (row_sel_i[r] && row_load_i) begin
          // A new row starts with every switch passing; its pair entries then set the commands.
          cmd_q <= '0;
        end else if (row_sel_i[r] && pair_load_i && ublock_sel_i[j]) begin
          cmd_q <= pair_cmd_i;
        end
      end
{% endif %}{% if ctx.pipeline_stages >= 1 %}      // The products reach ReCoN one cycle late, so the commands follow them.
      logic [{= ctx.cmd_bits - 1 =}:0] cmd_stage_q;
      always_ff @(posedge clk_i or negedge rst_ni) begin
        if (!rst_ni) cmd_stage_q <= '0;
        else         cmd_stage_q <= cmd_q;
      end
{% endif %}      msq_recon u_recon (
        .cmd_i   ({% if ctx.pipeline_stages >= 1 %}cmd_stage_q{% else %}cmd_q{% endif %}),
        .lanes_i (lane_in[j*{= ctx.m * ctx.lw =} +: {= ctx.m * ctx.lw =}]),
        .lanes_o (lane_out[j*{= ctx.m * ctx.lw =} +: {= ctx.m * ctx.lw =}])
      );
    end
    end else begin : g_plain_row
      // Rows without ReCoN never hold outlier pairs.
      assign lane_out = lane_in;
    end
{% else %}
    // Without outlier pairs there is nothing to merge.
    assign lane_out = lane_in;
{% endif %}  end

{% if ctx.pipeline_stages == 0 %}  always_ff @(posedge clk_i or negedge rst_ni) begin
    if (!rst_ni) begin
      out_valid_o <= 1'b0;
    end else begin
      out_valid_o <= valid_row_q[{= ctx.rows - 1 =}];
    end
  end
{% else %}  // The last row's sums trail its activations by the {= ctx.pipeline_stages =} pipeline register(s).
  logic [{= ctx.pipeline_stages =}:0] out_valid_q;
  always_ff @(posedge clk_i or negedge rst_ni) begin
    if (!rst_ni) begin
      out_valid_q <= '0;
    end else begin
      out_valid_q <= {out_valid_q[{= ctx.pipeline_stages - 1 =}:0], valid_row_q[{= ctx.rows - 1 =}]};
    end
  end
  assign out_valid_o = out_valid_q[{= ctx.pipeline_stages =}];
{% endif %}
  assign out_psum_o = psum_q[{= (ctx.rows - 1) * ctx.cols * ctx.acc =} +: {= ctx.cols * ctx.acc =}];

endmodule
