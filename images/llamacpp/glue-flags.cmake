# Included after each project() of llama.cpp (build.sh passes -DCMAKE_PROJECT_INCLUDE):
# optimisation where the time is spent. ggml and llama, the inference, keep Release's -O3;
# the server's glue, half of the compile time (HTTP, JSON, chat templates, argument
# parsing), is compiled at -O1, the multimodal loaders at -O2: per request that code runs
# microseconds next to the model's milliseconds, and at -O1 it compiles in about half the
# time (httplib.cpp: 34 s of CPU at -O3, 18 s at -O1).
if(CMAKE_VERSION VERSION_LESS 3.19 OR APPLIANCE_OPT_LEVELS_DEFERRED)
  return()
endif()
set(APPLIANCE_OPT_LEVELS_DEFERRED ON)

function(appliance_opt_levels)
  foreach(target cpp-httplib llama-common server-context llama-server-impl llama-server)
    if(TARGET ${target})
      target_compile_options(${target} PRIVATE -O1)
    endif()
  endforeach()
  if(TARGET mtmd)
    target_compile_options(mtmd PRIVATE -O2)
  endif()
endfunction()

# At the end of the top-level CMakeLists, when every target exists.
cmake_language(DEFER DIRECTORY ${CMAKE_SOURCE_DIR} CALL appliance_opt_levels)
