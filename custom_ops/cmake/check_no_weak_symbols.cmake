# cmake -DNM=<nm> -DOBJECTS=<a.o;b.o> -P check_no_weak_symbols.cmake
# Fails when an instruction-set-specific object defines a weak (W/V) or unique (u) symbol.
foreach(obj IN LISTS OBJECTS)
  execute_process(COMMAND "${NM}" --defined-only "${obj}" OUTPUT_VARIABLE symbols RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${NM} failed on ${obj}")
  endif()
  string(REGEX MATCHALL "[^\n]* [WVu] [^\n]*" weak "${symbols}")
  if(weak)
    string(REPLACE ";" "\n  " weak "${weak}")
    message(FATAL_ERROR "${obj} defines weak symbols; the linker could share ISA-specific code "
                        "with the baseline kernel:\n  ${weak}")
  endif()
endforeach()
