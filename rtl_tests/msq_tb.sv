{% include "header.sv" %}
// Testbench: loads the memory images with $readmemh, runs one layer and writes every output
// and the cycle count to outputs.txt. Cycle 0 is the cycle in which start is high; cycle n is
// sampled at the falling edge n clock periods later.
//
// Every PROGRESS_EVERY output lines, and after the last one, it prints
// "msq_progress <lines written> <lines expected> <cycle>" to stdout and flushes it, so that
// the host can show progress while the simulation runs. 0 turns the lines off.
module msq_tb;

  localparam int ROW_DEPTH = {= tb.row_depth =};
{% if ctx.has_pairs %}  localparam int PAIR_DEPTH = {= tb.pair_depth =};
{% endif %}{% if ctx.has_sharing %}  localparam int HDR_DEPTH = {= tb.hdr_depth =};
{% endif %}  localparam int ACT_DEPTH = {= tb.act_depth =};
  localparam int MAX_CYCLES = {= tb.max_cycles =};
  localparam int OUTPUT_LINES = {= tb.tiles * tb.vectors =};
  localparam int PROGRESS_EVERY = {= tb.progress_every =};

  logic clk = 1'b0;
  logic rst_n = 1'b0;
  logic start = 1'b0;
  always #5 clk = ~clk;

  logic [{= ctx.rww - 1 =}:0] row_mem [ROW_DEPTH];
{% if ctx.has_pairs %}  logic [{= ctx.pew - 1 =}:0] pair_mem [PAIR_DEPTH];
{% endif %}{% if ctx.has_sharing %}  logic [{= ctx.swap_bits =}:0] hdr_mem [HDR_DEPTH];
  logic [{= ctx.aw - 1 =}:0] hdr_addr;
  logic [{= ctx.swap_bits =}:0] hdr_word;
{% endif %}  logic [{= ctx.rows * ctx.a - 1 =}:0] act_mem [ACT_DEPTH];

  logic [{= ctx.aw - 1 =}:0] row_addr, act_addr;
  logic [{= ctx.rww - 1 =}:0] row_word;
  logic [{= ctx.rows * ctx.a - 1 =}:0] act_word;
{% if ctx.has_pairs %}  logic [{= ctx.aw - 1 =}:0] pair_addr;
  logic [{= ctx.pew - 1 =}:0] pair_word;
{% endif %}  logic out_valid, done;
  logic [{= ctx.cols * ctx.acc - 1 =}:0] out_psum;

  // Synchronous reads; addresses past the end read zero.
  always_ff @(posedge clk) begin
    row_word <= ({= ctx.aw =}'(ROW_DEPTH) > row_addr) ? row_mem[row_addr[{= tb.row_index_bits - 1 =}:0]] : '0;
    act_word <= ({= ctx.aw =}'(ACT_DEPTH) > act_addr) ? act_mem[act_addr[{= tb.act_index_bits - 1 =}:0]] : '0;
{% if ctx.has_pairs %}    pair_word <= ({= ctx.aw =}'(PAIR_DEPTH) > pair_addr) ? pair_mem[pair_addr[{= tb.pair_index_bits - 1 =}:0]] : '0;
{% endif %}{% if ctx.has_sharing %}    hdr_word <= ({= ctx.aw =}'(HDR_DEPTH) > hdr_addr) ? hdr_mem[hdr_addr[{= tb.hdr_index_bits - 1 =}:0]] : '0;
{% endif %}  end

  msq_top u_dut (
    .clk_i       (clk),
    .rst_ni      (rst_n),
    .start_i     (start),
    .tiles_i     ({= ctx.aw =}'d{= tb.tiles =}),
    .k_tiles_i   ({= ctx.aw =}'d{= tb.k_tiles =}),
    .vectors_i   ({= ctx.aw =}'d{= tb.vectors =}),
{% if ctx.mp %}    .wide_i      ({% if tb.wide %}1'b1{% else %}1'b0{% endif %}),
{% endif %}    .row_addr_o  (row_addr),
    .row_word_i  (row_word),
{% if ctx.has_pairs %}    .pair_addr_o (pair_addr),
    .pair_i      (pair_word),
{% endif %}{% if ctx.has_sharing %}    .hdr_addr_o  (hdr_addr),
    .hdr_i       (hdr_word),
{% endif %}    .act_addr_o  (act_addr),
    .act_i       (act_word),
    .out_valid_o (out_valid),
    .out_psum_o  (out_psum),
    .done_o      (done)
  );

`ifdef MSQ_TRACE
  initial begin
    $dumpfile("waves.fst");
    $dumpvars(0, msq_tb);
  end
`endif

  int fd;
  int cycle;
  int lines;
  logic finished;
  initial begin
    $readmemh("rows.hex", row_mem);
{% if ctx.has_pairs %}{% if tb.pair_entries > 0 %}    $readmemh("pairs.hex", pair_mem);
{% else %}    pair_mem[0] = '0;
{% endif %}{% endif %}{% if ctx.has_sharing %}    $readmemh("headers.hex", hdr_mem);
{% endif %}    $readmemh("acts.hex", act_mem);
    fd = $fopen("outputs.txt", "w");
    repeat (3) @(negedge clk);
    rst_n = 1'b1;
    @(negedge clk);
    start = 1'b1;
    cycle = 0;
    lines = 0;
    finished = 1'b0;
    while (!finished) begin
      @(negedge clk);
      start = 1'b0;
      cycle = cycle + 1;
      if (out_valid) begin
        $fwrite(fd, "%0d %h\n", cycle, out_psum);
        lines = lines + 1;
        if (PROGRESS_EVERY > 0 && (lines % PROGRESS_EVERY == 0 || lines == OUTPUT_LINES)) begin
          $display("msq_progress %0d %0d %0d", lines, OUTPUT_LINES, cycle);
          $fflush();
        end
      end
      if (done) begin
        finished = 1'b1;
      end else if (cycle > MAX_CYCLES) begin
        $fwrite(fd, "timeout %0d\n", cycle);
        $fclose(fd);
        $fatal(1, "no done after %0d cycles", cycle);
      end
    end
    $fwrite(fd, "done %0d\n", cycle);
    $fclose(fd);
    $finish;
  end

endmodule
