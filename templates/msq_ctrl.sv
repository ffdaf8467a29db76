{% include "header.sv" %}
// Controller: loads tile t+1 into the shadow registers while tile t computes, streams the
// activation vectors, and counts the outputs.
//
// Memories are read with one cycle of latency: each address output is a register that points
// at the next word to read, and the word arrives in the following cycle.
//
// Load schedule of one pass: every cycle issues one read. {% if ctx.has_sharing %}The pass header comes first. {% endif %}A row
// word read is followed, when the row holds F flagged micro-blocks, by F pair-entry reads, so a
// pass takes {% if ctx.has_sharing %}1 + {% endif %}{= ctx.rows =} + F cycles of reads{% if ctx.has_sharing %} ({= ctx.recon_rows =} rows instead of {= ctx.rows =} for a later pass of a tile){% endif %}{% if ctx.mp %} ({= ctx.rows / 2 =} rows
// in a {= ctx.bus =}-bit layer){% endif %} plus one
// cycle for the last word. The pass becomes ready the cycle after its last word.
// Compute schedule: a ready tile starts when the previous one has issued all of its vectors.
{% if ctx.double_buffered %}// The load of the next tile starts in the same cycle, into the shadow registers.
{% else %}// The weights are single-buffered, so the load of the next tile starts only after the last
// vector has been issued; each row is written after that vector has passed it.
{% endif %}
module msq_ctrl (
  input  logic                 clk_i,          // clock
  input  logic                 rst_ni,         // asynchronous reset, active low
  input  logic                 start_i,        // pulse: start a layer with the counts below
  input  logic [{= ctx.aw - 1 =}:0]   tiles_i,        // passes in the layer (tiles plus extra passes), at least 1
  input  logic [{= ctx.aw - 1 =}:0]   k_tiles_i,      // tiles along the input channels, at least 1
  input  logic [{= ctx.aw - 1 =}:0]   vectors_i,      // activation vectors per tile, at least 1
{% if ctx.mp %}  input  logic                 wide_i,         // {= ctx.bus =}-bit layer: each row word loads two PE rows
{% endif %}  output logic [{= ctx.aw - 1 =}:0]   row_addr_o,     // row-word memory address
{% if ctx.has_pairs %}  input  logic [{= ctx.cols * ctx.bus - 1 =}:0]   row_slots_i,    // slots of the row word read in the previous cycle
{% if ctx.has_micro %}  input  logic [{= ctx.ubr * ctx.u - 1 =}:0]   row_micro_i,    // micro-exponents of that row word
{% endif %}  output logic [{= ctx.aw - 1 =}:0]   pair_addr_o,    // pair-entry memory address
  input  logic [{= ctx.ubr - 1 =}:0]   flags_i,        // flagged micro-blocks of the row word read in the previous cycle
{% endif %}{% if ctx.has_sharing %}  output logic [{= ctx.aw - 1 =}:0]   hdr_addr_o,     // pass-header memory address
  input  logic                 hdr_same_i,     // bit 0 of the header read in the previous cycle: reuse the activations
  output logic                 hdr_load_o,     // the header read in the previous cycle is valid
{% endif %}  output logic [{= ctx.aw - 1 =}:0]   act_addr_o,     // activation memory address
  output logic                 row_load_o,     // the row word read in the previous cycle belongs to the PE row in row_sel_o
  output logic [{= ctx.rows - 1 =}:0]   row_sel_o,      // one-hot PE row being loaded
{% if ctx.has_pairs %}  output logic                 pair_load_o,    // the pair entry read in the previous cycle is valid
  output logic [{= ctx.ubr - 1 =}:0]   ublock_sel_o,   // one-hot micro-block that the pair entry belongs to
  output logic [{= ctx.cols * ctx.bus - 1 =}:0]   buf_slots_o,    // slots of the row whose pair entries arrive
{% if ctx.has_micro %}  output logic [{= ctx.ubr * ctx.u - 1 =}:0]   buf_micro_o,    // micro-exponents of that row
{% endif %}{% endif %}{% if ctx.array_swap %}  output logic                 swap_o,         // the activation word read now starts a new tile
{% endif %}  output logic                 act_valid_o,    // the activation word read in the previous cycle is valid
  input  logic                 out_valid_i,    // the array emits one vector's column sums
  output logic                 done_o          // every output of the layer has been emitted
);

  logic busy_q;
  logic [{= ctx.aw - 1 =}:0] vectors_left_q;  // vectors of the current pass still to issue

  // ------------------------------------------------------------------ load engine
  logic load_active_q;                // a tile is being read into the shadow registers
  logic [{= ctx.aw - 1 =}:0] load_tiles_q;   // tiles whose load has started
  logic [{= ctx.rows - 1 =}:0] next_row_q;      // one-hot row to read next; zero once every row is read
  logic [{= ctx.rows - 1 =}:0] row_sel_q;       // one-hot row of the word in flight
  logic row_pending_q;                // a row word arrives this cycle
  logic full_q;                       // the shadow registers hold a complete tile
  logic [{= ctx.aw - 1 =}:0] row_addr_q;
  logic issue_row, last_word, load_start, swap;
{% if ctx.mp %}  // A wide row word writes rows 2k and 2k+1, and row 2k+1 switches to the loading tile
  // 2k+1 cycles after row 0. A cycle without a row read after each row word keeps every
  // write at or after its row's switch; pair reads fill that cycle when the row has them.
  logic row_gap_q;
{% endif %}{% if ctx.has_sharing %}  logic hdr_issued_q;                 // the current load has read its header
  logic hdr_pending_q;                // a header arrives this cycle
  logic same_shadow_q;                // the loaded pass reuses the previous activations
  logic [{= ctx.aw - 1 =}:0] hdr_addr_q;
  logic issue_hdr;
  assign issue_hdr = load_active_q && !hdr_issued_q;
{% endif %}
{% if ctx.has_pairs %}  logic pair_pending_q;               // a pair entry arrives this cycle
  logic [{= ctx.cw - 1 =}:0] pairs_todo_q;    // pair reads still to issue for the current row
  logic [{= ctx.ubr - 1 =}:0] flags_q;        // flagged micro-blocks whose entries have not arrived
  logic [{= ctx.aw - 1 =}:0] pair_addr_q;
  logic [{= ctx.cols * ctx.bus - 1 =}:0] buf_slots_q;
{% if ctx.has_micro %}  logic [{= ctx.ubr * ctx.u - 1 =}:0] buf_micro_q;
{% endif %}  logic [{= ctx.cw - 1 =}:0] flag_count;
  logic issue_pair;
  logic [{= ctx.cw - 1 =}:0] pairs_todo_d;

  assign flag_count = {= ctx.flag_count_expr =};

  always_comb begin
    issue_pair   = 1'b0;
    pairs_todo_d = pairs_todo_q;
    if (row_pending_q && flag_count != '0) begin
      issue_pair   = 1'b1;
      pairs_todo_d = flag_count - 1'b1;
    end else if (pairs_todo_q != '0) begin
      issue_pair   = 1'b1;
      pairs_todo_d = pairs_todo_q - 1'b1;
    end
  end
{% if ctx.has_sharing %}  // A later pass of a tile reads only the first {= ctx.recon_rows =} rows, which have ReCoN.
  logic rows_left;
  assign rows_left = next_row_q != '0 && !(same_shadow_q && next_row_q[{= ctx.recon_rows =}]);
  assign issue_row = load_active_q && hdr_issued_q && rows_left && !issue_pair;
  assign last_word = (row_pending_q || pair_pending_q) && !issue_row && !issue_pair && !issue_hdr;
{% else if ctx.mp %}  assign issue_row = load_active_q && next_row_q != '0 && !issue_pair && !(wide_i && row_gap_q);
  assign last_word = (row_pending_q || pair_pending_q) && !issue_row && !issue_pair && next_row_q == '0;
{% else %}  assign issue_row = load_active_q && next_row_q != '0 && !issue_pair;
  assign last_word = (row_pending_q || pair_pending_q) && !issue_row && !issue_pair;
{% endif %}
{% else %}
{% if ctx.mp %}  assign issue_row = load_active_q && next_row_q != '0 && !(wide_i && row_gap_q);
  assign last_word = row_pending_q && !issue_row && next_row_q == '0;
{% else %}  assign issue_row = load_active_q && next_row_q != '0;
  assign last_word = row_pending_q && !issue_row;
{% endif %}
{% endif %}
{% if ctx.double_buffered %}  assign load_start = busy_q && !load_active_q && (!full_q || swap) && load_tiles_q != tiles_i;
{% else %}  // Single buffer: a load starts only once the previous pass has issued all of its vectors.
  assign load_start = busy_q && !load_active_q && !full_q && vectors_left_q == '0 && load_tiles_q != tiles_i;
{% endif %}

  always_ff @(posedge clk_i or negedge rst_ni) begin
    if (!rst_ni) begin
      load_active_q <= 1'b0;
      load_tiles_q  <= '0;
      next_row_q    <= '0;
      row_sel_q     <= '0;
      row_pending_q <= 1'b0;
      full_q        <= 1'b0;
      row_addr_q    <= '0;
{% if ctx.mp %}      row_gap_q     <= 1'b0;
{% endif %}{% if ctx.has_sharing %}      hdr_issued_q   <= 1'b0;
      hdr_pending_q  <= 1'b0;
      same_shadow_q  <= 1'b0;
      hdr_addr_q     <= '0;
{% endif %}{% if ctx.has_pairs %}      pair_pending_q <= 1'b0;
      pairs_todo_q   <= '0;
      flags_q        <= '0;
      pair_addr_q    <= '0;
      buf_slots_q    <= '0;
{% if ctx.has_micro %}      buf_micro_q    <= '0;
{% endif %}{% endif %}    end else if (start_i) begin
      load_active_q <= 1'b0;
      load_tiles_q  <= '0;
      next_row_q    <= '0;
      row_pending_q <= 1'b0;
{% if ctx.mp %}      row_gap_q     <= 1'b0;
{% endif %}      full_q        <= 1'b0;
      row_addr_q    <= '0;
{% if ctx.has_sharing %}      hdr_issued_q   <= 1'b0;
      hdr_pending_q  <= 1'b0;
      hdr_addr_q     <= '0;
{% endif %}{% if ctx.has_pairs %}      pair_pending_q <= 1'b0;
      pairs_todo_q   <= '0;
      pair_addr_q    <= '0;
{% endif %}    end else begin
      if (load_start) begin
        load_active_q <= 1'b1;
        load_tiles_q  <= load_tiles_q + 1'b1;
        next_row_q    <= {= ctx.rows =}'d1;
{% if ctx.has_sharing %}        hdr_issued_q  <= 1'b0;
{% endif %}      end
{% if ctx.has_sharing %}      hdr_pending_q <= issue_hdr;
      if (issue_hdr) begin
        hdr_issued_q <= 1'b1;
        hdr_addr_q   <= hdr_addr_q + 1'b1;
      end
      if (hdr_pending_q) begin
        same_shadow_q <= hdr_same_i;
      end
{% endif %}
      row_pending_q <= issue_row;
{% if ctx.mp %}      row_gap_q     <= issue_row;
{% endif %}      if (issue_row) begin
        row_addr_q <= row_addr_q + 1'b1;
        row_sel_q  <= next_row_q;
{% if ctx.mp %}        next_row_q <= wide_i ? next_row_q << 2 : next_row_q << 1;
{% else %}        next_row_q <= next_row_q << 1;
{% endif %}
      end
{% if ctx.has_pairs %}      pair_pending_q <= issue_pair;
      pairs_todo_q   <= pairs_todo_d;
      if (issue_pair) begin
        pair_addr_q <= pair_addr_q + 1'b1;
      end
      if (row_pending_q) begin
        flags_q     <= flags_i;
        buf_slots_q <= row_slots_i;
{% if ctx.has_micro %}        buf_micro_q <= row_micro_i;
{% endif %}      end else if (pair_pending_q) begin
        // The entry just written belongs to the lowest flagged micro-block.
        flags_q <= flags_q & (flags_q - 1'b1);
      end
{% endif %}      if (last_word) begin
        load_active_q <= 1'b0;
        full_q        <= 1'b1;
      end else if (swap) begin
        full_q <= 1'b0;
      end
    end
  end

  assign row_addr_o = row_addr_q;
{% if ctx.has_sharing %}  assign hdr_addr_o = hdr_addr_q;
  assign hdr_load_o = hdr_pending_q;
{% endif %}
  assign row_load_o = row_pending_q;
{% if ctx.mp %}  // A wide row word fills the low lanes (even row) and the high lanes (odd row) at once.
  assign row_sel_o  = wide_i ? (row_sel_q | (row_sel_q << 1)) : row_sel_q;
{% else %}  assign row_sel_o  = row_sel_q;
{% endif %}
{% if ctx.has_pairs %}  assign pair_addr_o  = pair_addr_q;
  assign pair_load_o  = pair_pending_q;
  assign ublock_sel_o = flags_q & (~flags_q + 1'b1);
  assign buf_slots_o  = buf_slots_q;
{% if ctx.has_micro %}  assign buf_micro_o  = buf_micro_q;
{% endif %}{% else %}
  // Without outlier pairs only the slots and micro-exponents of a row word reach the decode.
{% endif %}
  // --------------------------------------------------------------- compute engine
  logic [{= ctx.aw - 1 =}:0] act_addr_q;      // next activation word after the swap cycle
  logic [{= ctx.aw - 1 =}:0] act_base_q;      // first activation word of the current pass
  logic [{= ctx.aw - 1 =}:0] k_tile_q;        // row tile of the current pass
  logic first_q;                      // no pass has started since start_i
  logic act_issue;
{% if ctx.array_swap %}  logic swap_q;
{% endif %}  logic act_valid_q;
  logic [{= ctx.aw - 1 =}:0] next_base, next_k_tile;

  assign swap      = busy_q && full_q && vectors_left_q == '0;
  assign act_issue = swap || vectors_left_q != '0;

  // A pass reads the next row tile's activations (wrapping after k_tiles_i, because tiles run
  // along the input channels first){% if ctx.has_sharing %}, or the same ones when its header says so{% endif %}.
  always_comb begin
    if (first_q) begin
      next_base   = '0;
      next_k_tile = '0;
{% if ctx.has_sharing %}    end else if (same_shadow_q) begin
      next_base   = act_base_q;
      next_k_tile = k_tile_q;
{% endif %}    end else if (k_tile_q == k_tiles_i - 1'b1) begin
      next_base   = '0;
      next_k_tile = '0;
    end else begin
      next_base   = act_base_q + vectors_i;
      next_k_tile = k_tile_q + 1'b1;
    end
  end

  always_ff @(posedge clk_i or negedge rst_ni) begin
    if (!rst_ni) begin
      vectors_left_q <= '0;
      act_addr_q     <= '0;
      act_base_q     <= '0;
      k_tile_q       <= '0;
      first_q        <= 1'b1;
{% if ctx.array_swap %}      swap_q         <= 1'b0;
{% endif %}      act_valid_q    <= 1'b0;
    end else if (start_i) begin
      vectors_left_q <= '0;
      act_addr_q     <= '0;
      act_base_q     <= '0;
      k_tile_q       <= '0;
      first_q        <= 1'b1;
{% if ctx.array_swap %}      swap_q         <= 1'b0;
{% endif %}      act_valid_q    <= 1'b0;
    end else begin
{% if ctx.array_swap %}      swap_q      <= swap;
{% endif %}
      act_valid_q <= act_issue;
      if (swap) begin
        vectors_left_q <= vectors_i - 1'b1;
        act_base_q     <= next_base;
        k_tile_q       <= next_k_tile;
        act_addr_q     <= next_base + 1'b1;
        first_q        <= 1'b0;
      end else if (act_issue) begin
        vectors_left_q <= vectors_left_q - 1'b1;
        act_addr_q     <= act_addr_q + 1'b1;
      end
    end
  end

  // The first vector of a pass is read in its swap cycle.
  assign act_addr_o  = swap ? next_base : act_addr_q;
{% if ctx.array_swap %}  assign swap_o      = swap_q;
{% endif %}
  assign act_valid_o = act_valid_q;

  // ------------------------------------------------------------------- output count
  logic [{= ctx.aw - 1 =}:0] out_vector_q;    // vector index of the next output within its tile
  logic [{= ctx.aw - 1 =}:0] out_tiles_q;     // tiles whose outputs are complete

  always_ff @(posedge clk_i or negedge rst_ni) begin
    if (!rst_ni) begin
      busy_q       <= 1'b0;
      out_vector_q <= '0;
      out_tiles_q  <= '0;
    end else if (start_i) begin
      busy_q       <= 1'b1;
      out_vector_q <= '0;
      out_tiles_q  <= '0;
    end else if (out_valid_i) begin
      if (out_vector_q == vectors_i - 1'b1) begin
        out_vector_q <= '0;
        out_tiles_q  <= out_tiles_q + 1'b1;
      end else begin
        out_vector_q <= out_vector_q + 1'b1;
      end
    end
  end

  assign done_o = busy_q && out_tiles_q == tiles_i;

endmodule
